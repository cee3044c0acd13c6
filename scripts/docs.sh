#!/usr/bin/env bash
# Builds the API reference from the docstrings (pdoc, Google style) into docs/api; open
# docs/api/index.html. Sets up ./.venv like scripts/test.sh. An argument replaces the output folder.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" dev
cd "$root"
out="${1:-docs/api}"
python - "$out" <<'PY'
import pathlib
import sys
import warnings

import pdoc
import pdoc.render

import jmaml

for name in jmaml.__all__:  # jmaml loads its names lazily (PEP 562); pdoc reads the namespace
    getattr(jmaml, name)
# NamedTuple constructors' string annotations cannot always be resolved; the fields are documented anyway
warnings.filterwarnings("ignore", message="Error parsing type annotation")
pdoc.render.configure(docformat="google", show_source=False, search=True)
# the package, and the modules its top-level names come from
pdoc.pdoc("jmaml", "jmaml.core.types", "jmaml.core.protocols", "jmaml.core.meta", "jmaml.core.inner",
          "jmaml.core.inner_optimisers", "jmaml.core.adapters", "jmaml.run.config",
          output_directory=pathlib.Path(sys.argv[1]))
PY
echo "[jmaml] API reference: $root/$out/index.html" >&2
