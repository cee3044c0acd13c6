import sys

from jmaml.cli import main

sys.exit(main())
