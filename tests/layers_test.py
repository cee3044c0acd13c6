"""The architecture, read from the imports: every module of jmaml belongs to one layer, and no module
imports one of a higher layer (function-level imports included); the import graph has no circles.

  0 core          pure functions and plain data: types, checks, losses, models, the inner loop, the
                  meta-objective, checkpoints' file format, metric writers
  1 learners      the learners and their estimators, task families, RL environments and policies
  2 engine        fit, populations, blocking, devices, run-dir ownership, evaluation as a library
  3 run layer     recipes, configs, run folders, the paper's protocol, sweeps, results, plots
  4 command       the jmaml command
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jmaml")

LAYERS = {
    0: ["types", "_util", "_checks", "flags", "_signals", "analytic", "checkpoint", "fingerprint", "writers",
        "protocols", "inner_optimisers", "inner", "meta", "losses", "models", "diagnostics", "adapters"],
    1: ["estimators", "fused", "walkthrough", "learners", "learners.*", "tasks", "tasks.*", "rl.envs",
        "rl.policies", "rl.rollouts", "rl.learner"],
    2: ["distributed", "blocking", "runstore", "engine", "population", "gradcheck", "evaluation", "rl.evaluation"],
    3: ["config", "recipes", "runs", "rundir", "runinfo", "evaluate", "train", "sweep", "plot", "rl.recipe", "rl"],
    4: ["cli", "_entry", "__main__"],
}
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
    short = module.removeprefix("jmaml.")
    for layer, names in LAYERS.items():
        for name in names:
            if short == name or (name.endswith(".*") and short.startswith(name[:-1])):
                return layer
    return None


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
    assert not missing, f"modules without a layer (add them to LAYERS): {missing}"


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


@pytest.mark.parametrize("source,target", [("jmaml.engine", "jmaml.config"), ("jmaml.rl.evaluation", "jmaml.evaluate")])
def test_the_reader_sees_a_violation(source, target, monkeypatch):
    """The test above can fail: an engine module importing the run layer is reported."""
    monkeypatch.setitem(GRAPH, source, GRAPH[source] | {target})
    with pytest.raises(AssertionError, match=f"{source} .* imports {target}"):
        test_no_module_imports_a_higher_layer()
