#!/usr/bin/env bash
# Sets up ./.venv (if needed), lints, and runs the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" dev
cd "$root"
ruff check jmaml tests scripts experiments
# Two workers, tests spread one by one (the multi-process tests dominate a file); plain `pytest` works too.
exec python -m pytest -q -n 2 --dist load "$@"
