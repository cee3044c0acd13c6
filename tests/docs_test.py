"""The public API is documented: every name in ``PUBLIC`` has a docstring with Args (when it takes
arguments), Returns (functions that return something), Raises (where it raises on bad input) and a
runnable example (run by the doctests, ``--doctest-modules``)."""

import inspect

import procs
import pytest

import jmaml
from jmaml import learners
from jmaml.core import fused, models
from jmaml.engine import checkpoint, writers
from jmaml.run import runinfo
from jmaml.run.evaluate import evaluate
from jmaml.tasks import images, sinusoid

PUBLIC = [
    # the top level
    jmaml.fit, jmaml.adapt, jmaml.inner_step, jmaml.make_loss, jmaml.task_objective, jmaml.batched_objective,
    jmaml.maml_value_and_grad, jmaml.make_step, jmaml.make_estimator_step, jmaml.init_state,
    jmaml.check_meta_gradient, jmaml.Batch, jmaml.Task, jmaml.Model, jmaml.TaskDistribution, jmaml.MetaLearner,
    jmaml.TrainState,
    # what a user's script reaches for next
    evaluate, learners.make, learners.maml, models.mlp, models.conv4, models.resnet12, models.mixed_precision,
    fused.maml_value_and_grad,
    checkpoint.save, checkpoint.restore, checkpoint.arrays, checkpoint.key_paths, runinfo.inspect_run,
    writers.JsonlWriter, writers.CallbackWriter, writers.TensorBoardWriter, sinusoid.distribution,
    images.distribution, images.load_cifar_fs, images.load_fc100,
]


def _params(obj):
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [p for p in sig.parameters if p not in ("self", "args", "kwargs")]


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda o: f"{o.__module__}.{o.__qualname__}")
def test_public_api_is_documented_with_an_example(obj):
    doc = inspect.getdoc(obj) or ""
    assert len(doc.splitlines()) > 3, "no docstring"
    assert ">>>" in doc, "no runnable example"
    if inspect.isclass(obj):
        if issubclass(obj, tuple):  # NamedTuples document their fields
            assert "Attributes:" in doc or "Args:" in doc, "fields are not documented"
        elif _params(obj):
            assert "Args:" in doc, "arguments are not documented"
        return
    if _params(obj):
        assert "Args:" in doc, "arguments are not documented"
    returns = inspect.signature(obj).return_annotation
    if returns not in (None, "None", inspect.Signature.empty):
        assert "Returns:" in doc, "the return value is not documented"
    if "raise " in inspect.getsource(obj) or "check_" in inspect.getsource(obj):
        assert "Raises:" in doc, "what it raises on bad input is not documented"


def test_the_api_reference_builds(tmp_path):
    pytest.importorskip("pdoc")
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(["bash", os.path.join(root, "scripts", "docs.sh"), str(tmp_path / "api")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "api" / "jmaml.html").read_text()
    for name in ("fit", "maml_value_and_grad", "TaskDistribution", "check_meta_gradient"):
        assert f'id="{name}"' in page, name
    for page in ("engine/writers", "engine/loop", "core/meta", "run/config"):  # the layer folders
        assert (tmp_path / "api" / "jmaml" / f"{page}.html").exists(), page
    assert "Warn" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr


def _readme_names():
    """Every dotted ``jmaml.`` name README uses, and each name its module table lists for a module."""
    import os
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
              encoding="utf-8") as f:
        text = f.read()
    dotted = set(re.findall(r"(?<![\w.])jmaml(?:\.[A-Za-z_]\w*)+", text))
    for row in re.findall(r"^\| ((?:`jmaml[\w.]*`(?:, )?)+) \| (.*) \|$", text, flags=re.M):
        modules = re.findall(r"`(jmaml[\w.]*)`", row[0])
        names = [n for n in re.findall(r"`([A-Za-z_]\w*)(?:\(|`)", row[1])]
        for name in names:
            owners = [m for m in modules if name not in _DESCRIPTIVE]
            if owners:
                dotted.add(f"{owners[0]}.{name}" if len(owners) == 1 else f"{owners}|{name}")
    return sorted(dotted)


# words the module table uses in backticks that are not names of that module (a learner module's own OPTIONS,
# keyword arguments of a function named beside them)
_DESCRIPTIVE = {"OPTIONS", "unroll", "remat", "max_steps", "first_order", "inner_optimiser", "model_state", "observe",
                "sum", "mean", "backend", "run_dir", "resume", "fit", "TrainConfig"}


def test_every_name_readme_uses_is_reachable_after_import_jmaml():
    """The documented path works as written: a fresh process that only runs ``import jmaml`` reaches every
    ``jmaml.x.y`` README names and every name its module table lists (``jmaml.adapters.equinox`` raised
    AttributeError before ``jmaml.learners`` had been imported)."""
    import json
    import subprocess
    import sys

    names = _readme_names()
    assert "jmaml.adapters" in " ".join(names) and len(names) > 40
    code = f"""
import json, jmaml
missing = []
for dotted in {json.dumps(names)}:
    if "|" in dotted:
        modules, name = dotted.split("|")
        candidates = [m.strip("[]' ") + "." + name for m in modules.split(",")]
    else:
        candidates = [dotted]
    ok = False
    for path in candidates:
        obj, parts = jmaml, path.split(".")[1:]
        try:
            for p in parts:
                obj = getattr(obj, p)
            ok = True
        except AttributeError:
            pass
    if not ok:
        missing.append(dotted)
print(json.dumps(missing))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert missing == [], missing


def test_every_top_level_name_is_reachable():
    for name in jmaml.__all__:
        assert getattr(jmaml, name) is not None, name


@pytest.mark.slow
def test_every_readme_python_block_runs_as_pasted(tmp_path):
    """Each ```python block of README.md, alone in a fresh interpreter in an empty folder, as a user pastes it."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        proc = procs.run_python(block, cwd=str(tmp_path), timeout=600)
        assert proc.returncode == 0, f"README python block {i} ({block.splitlines()[0]}):\n{proc.stderr[-2000:]}"
