#!/usr/bin/env bash
# Sets up ./.venv (if needed), lints, and runs the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" dev
cd "$root"
ruff check jmaml tests scripts experiments
# Two workers, one test file each (module fixtures stay single); plain `pytest` works too.
exec python -m pytest -q -n 2 --dist loadfile "$@"
