#!/usr/bin/env bash
# Sets up ./.venv (if needed), lints, and runs the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" dev
cd "$root"
ruff check jmaml tests scripts experiments
# Types: the package, and a user's script under --strict against jmaml's annotations (py.typed).
mypy
mypy --strict --follow-imports=silent tests/typecheck/user_code.py
# The suite and the docstrings' examples (doctests); two workers, tests spread one by one (the multi-process
# tests dominate a file); plain `pytest` works too.
exec python -m pytest -q -n 2 --dist load "$@"
