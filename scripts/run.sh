#!/usr/bin/env bash
# Sets up ./.venv (if needed) and runs jmaml's main job with its defaults.
# Default: `jmaml train` (sinusoid MAML, the paper's settings). Extra arguments replace it,
# e.g. `bash scripts/run.sh seed --json`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" plot
cd "$root"
if [ $# -eq 0 ]; then
  set -- train
fi
exec jmaml "$@"
