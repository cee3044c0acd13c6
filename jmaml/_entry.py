"""The ``jmaml`` command's entry point: standard library only until the signal handler is in place.

Importing JAX takes a second or two; a SIGINT or SIGTERM in that time is recorded here and honoured
once the command runs (``jmaml train`` checkpoints and stops; the other commands stop), instead of
being lost or ending in a raw KeyboardInterrupt trace.
"""

from __future__ import annotations

import sys

from jmaml.engine._signals import StopFlag


def main(argv: list[str] | None = None) -> int:
    with StopFlag() as flag:
        try:
            from jmaml import cli
        except KeyboardInterrupt:  # a second signal while importing
            print("jmaml: interrupted", file=sys.stderr)
            return 130
        return cli.main(argv, early_flag=flag)
