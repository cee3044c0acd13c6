"""The public API is documented: every name in ``PUBLIC`` has a docstring with Args (when it takes
arguments), Returns (functions that return something), Raises (where it raises on bad input) and a
runnable example (run by the doctests, ``--doctest-modules``)."""

import inspect

import pytest

import jmaml
from jmaml import checkpoint, fused, learners, models, runinfo, writers
from jmaml.evaluate import evaluate
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
    assert (tmp_path / "api" / "jmaml" / "writers.html").exists()
    assert "Warn" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
