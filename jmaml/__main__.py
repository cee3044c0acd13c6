import sys

from jmaml._entry import main

sys.exit(main())
