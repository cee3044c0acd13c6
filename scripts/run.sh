#!/usr/bin/env bash
# Sets up ./.venv (if needed) and runs jmaml's main job with its defaults.
# Extra arguments are passed to the command, e.g. `bash scripts/run.sh seed --json`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" plot
cd "$root"
if [ $# -eq 0 ]; then
  set -- seed
fi
exec jmaml "$@"
