#!/usr/bin/env bash
# Sets up ./.venv (if needed), lints, and runs the whole test suite.
#   bash scripts/test.sh [PYTEST ARGS]          the suite (plain `pytest` works too)
#   bash scripts/test.sh --isa AVX,SSE4_2       then the numeric test files again under each XLA:CPU instruction
#                                               set (XLA picks other kernels per set, and float32 results move in
#                                               the last bits): what a contributor on another CPU would get
set -euo pipefail
isa=""
if [ "${1:-}" = "--isa" ]; then
  isa="${2:?--isa needs a comma-separated list such as AVX2,AVX,SSE4_2}"
  shift 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" dev
cd "$root"
ruff check jmaml tests scripts experiments
# Types: the package, and a user's script under --strict against jmaml's annotations (py.typed).
mypy
mypy --strict --follow-imports=silent tests/typecheck/user_code.py
# The suite and the docstrings' examples (doctests); two workers, tests spread one by one (the multi-process
# tests dominate a file).
python -m pytest -q -n 2 --dist load "$@"
# The numeric files (every test that compares numbers; not the CLI, run-folder and process tests) per ISA.
for set in ${isa//,/ }; do
  echo "[jmaml] numeric tests under --xla_cpu_max_isa=$set" >&2
  XLA_FLAGS="--xla_cpu_max_isa=$set ${XLA_FLAGS:-}" python -m pytest -q -n 2 --dist load tests jmaml \
    --ignore=tests/cli_test.py --ignore=tests/killresume_test.py --ignore=tests/ownership_test.py \
    --ignore=tests/sweep_run_test.py --ignore=tests/docs_test.py --ignore=tests/rundir_test.py \
    --ignore=tests/checkpoint_test.py --ignore=tests/writers_test.py "$@"
done
