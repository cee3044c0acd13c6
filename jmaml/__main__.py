"""``python -m jmaml``: the ``jmaml`` command."""

import sys

from jmaml._entry import main

if __name__ == "__main__":
    sys.exit(main())
