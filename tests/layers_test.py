"""The architecture, read from the imports: jmaml's folders are its layers, no module imports one of a higher
layer (function-level imports included), and the import graph has no circles.

  0 jmaml/core/        pure functions and plain data: types, checks, losses, models and adapters, the inner
                       loop and inner optimisers, the meta-objective, estimators, the fused kernel, flags
  1 jmaml/learners/    the learners; jmaml/tasks/ the task families; jmaml/rl/ environments, policies,
                       rollouts and the MAML-RL learners
  2 jmaml/engine/      fit, populations, blocking, devices, checkpoints, fingerprints, the run-dir store,
                       signals, evaluation as a library, the gradient check
  3 jmaml/run/         recipes, configs, run folders, the paper's protocols, sweeps, results, plots
  4 jmaml/*.py         the jmaml command
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jmaml")

FOLDERS = {"core": 0, "learners": 1, "tasks": 1, "rl": 1, "engine": 2, "run": 3}  # a folder is a layer
COMMAND = 4  # the modules directly in jmaml/: the command and its entry points
UNLAYERED = {"jmaml"}  # the package's lazy front door (PEP 562): it names every module, imports none eagerly


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in FOLDERS:
        return FOLDERS[parts[1]]
    return COMMAND if len(parts) == 2 and parts[0] == "jmaml" else None


def _imports(module: str) -> set[str]:
    """The jmaml modules ``module`` imports, anywhere in its file."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:  # `from jmaml import engine` imports the module jmaml.engine
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if m not in UNLAYERED and _layer(m) is None)
    assert not missing, f"modules outside the layer folders (add the folder to FOLDERS): {missing}"


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m in sorted(GRAPH) if m not in UNLAYERED for d in sorted(GRAPH[m])
              if d not in UNLAYERED and _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circles():
    state: dict[str, int] = {}
    circles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(GRAPH[m] - UNLAYERED):
            if state.get(d) == 1:
                circles.append(" -> ".join([*path[path.index(d):], d]))
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state and m not in UNLAYERED:
            visit(m, [m])
    assert not circles, "\n".join(circles)


@pytest.mark.parametrize("source,target", [("jmaml.engine.loop", "jmaml.run.config"),
                                           ("jmaml.engine.rl_evaluation", "jmaml.run.evaluate"),
                                           ("jmaml.core.inner", "jmaml.learners.maml")])
def test_the_reader_sees_a_violation(source, target, monkeypatch):
    """The test above can fail: a module importing a higher layer is reported."""
    monkeypatch.setitem(GRAPH, source, GRAPH[source] | {target})
    with pytest.raises(AssertionError, match=f"{source} .* imports {target}"):
        test_no_module_imports_a_higher_layer()


def test_the_former_flat_paths_are_the_moved_modules():
    """``import jmaml.sweep``, ``from jmaml.config import TrainConfig``, ``jmaml.rl.recipe``, ``jmaml.engine.fit``:
    each path from before the layer folders is the moved module itself, in a fresh interpreter."""
    import procs

    code = """
import importlib, sys
import jmaml
from jmaml.core.moved import MOVED
assert 'jax' not in sys.modules, 'import jmaml imported JAX'
for old, new in MOVED.items():
    if old == 'jmaml.engine':
        continue
    assert importlib.import_module(old) is importlib.import_module(new), old
import jmaml.sweep
from jmaml.config import TrainConfig
from jmaml.engine import fit, RunDir, diverged_steps
from jmaml.rl.recipe import RLConfig
from jmaml.run.config import TrainConfig as T
import jmaml.engine.loop as loop
assert TrainConfig is T and fit is loop.fit and jmaml.fit is fit and jmaml.sweep.Grid is jmaml.run.sweep.Grid
assert jmaml.rl.recipe.RLConfig is RLConfig and jmaml.rl.evaluation is jmaml.engine.rl_evaluation
print('ok')
"""
    out = procs.run_python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_fingerprints_name_functions_by_their_former_modules():
    """A run fingerprinted before the layer folders resumes after them: a moved function is named as before."""
    from jmaml.core import inner
    from jmaml.core.moved import FORMER, MOVED
    from jmaml.engine import fingerprint, loop

    assert fingerprint._name(inner.adapt) == "jmaml.inner.adapt"
    assert fingerprint._name(loop.fit) == "jmaml.engine.fit"
    assert all(FORMER[new] == old for old, new in MOVED.items())
    assert all(new.startswith(("jmaml.core.", "jmaml.engine.", "jmaml.run.")) for new in MOVED.values())
