# Sourced by scripts/run.sh and scripts/test.sh: make ./.venv with jmaml installed (editable)
# with the given extras. Idempotent: reinstalls only when pyproject.toml or the extras change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="$1"
venv="$root/.venv"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[jmaml] creating $venv" >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.jmaml-installed-$extras"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[jmaml] installing jmaml[$extras] into $venv (first run takes a minute)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e "$root[$extras]" >&2
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
