import jax
import numpy as np
import pytest

from jmaml import Batch, adapt, make_loss
from jmaml.core import models
from jmaml.run import evaluate


def test_heldout_tasks_are_the_same_on_every_call():
    a = evaluate.heldout_tasks(num_tasks=600)
    b = evaluate.heldout_tasks(num_tasks=600)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    val = evaluate.heldout_tasks(seed=evaluate.VALIDATION_SEED, num_tasks=600)
    assert not np.array_equal(val.params.amplitude, a.params.amplitude)


def test_adaptation_curve_equals_adapt_then_query_loss():
    model = models.mlp([1, 8, 1])
    loss = make_loss(model.apply, "mse")
    params = model.init(jax.random.key(0))
    tasks = evaluate.heldout_tasks(num_tasks=3, max_shots=5, num_query=7)
    curve = np.asarray(evaluate.adaptation_curve(loss, params, tasks.support, tasks.query,
                                                 inner_lr=0.05, num_steps=4))
    assert curve.shape == (3, 5)
    for t in range(5):
        # The oracle: adapt then score, one task at a time (a Python loop, not vmap).
        one = jax.jit(lambda s, q, t=t: loss(adapt(loss, params, s, inner_lr=0.05, num_steps=t), q))
        for j in range(3):
            want = float(one(Batch(tasks.support.x[j], tasks.support.y[j]), Batch(tasks.query.x[j], tasks.query.y[j])))
            assert curve[j, t] == pytest.approx(want, rel=1e-5)


def test_summarize_mean_and_ci():
    losses = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    s = evaluate.summarize(losses)
    assert s["mean"] == pytest.approx([3.0, 2.0])
    assert s["ci95"] == pytest.approx([1.96 * 2.0 / np.sqrt(3), 0.0])
    assert s["mean_all"] == pytest.approx([3.0, 2.0])
    assert s["diverged"] == [0, 0] and s["median"] == pytest.approx([3.0, 2.0])


def test_summarize_counts_diverged_tasks_instead_of_returning_nan():
    losses = np.array([[1.0, 2.0], [3.0, np.nan], [5.0, np.inf], [7.0, 4.0]])
    s = evaluate.summarize(losses)
    assert s["diverged"] == [0, 2]
    assert s["mean"] == pytest.approx([4.0, 3.0])
    assert s["ci95"][1] == pytest.approx(1.96 * np.std([2.0, 4.0], ddof=1) / np.sqrt(2))
    r = {"maml": {"10": {"inner_lr": 0.01, **s}}}
    assert s["mean_all"][1] != s["mean_all"][1]  # every task's mean is NaN: reported beside the kept ones'
    assert "(2/4 diverged; all tasks nan)" in evaluate.format_table(r, steps=(1,))


def test_summarize_counts_an_exploding_but_finite_task_as_diverged():
    losses = np.array([[1.0, 0.5, 2.0e3], [2.0, 1.0, 1.5], [3.0, 2.0, 1.0]])  # task 0: 2000x its start
    s = evaluate.summarize(losses)
    assert s["diverged"] == [0, 0, 1]
    assert s["mean"][2] == pytest.approx(1.25) and s["mean_all"][2] == pytest.approx((2.0e3 + 2.5) / 3)
    assert evaluate.summarize(losses, diverged_ratio=np.inf)["diverged"] == [0, 0, 0]


def test_format_table_has_one_row_per_model_and_k():
    r = {"maml": {"5": {"inner_lr": 0.01, "mean": [1.0] * 11, "ci95": [0.1] * 11,
                        "diverged": [0] * 11, "num_tasks": 600}}}
    table = evaluate.format_table(r)
    assert "| maml | 5 | 0.01 | 1.000 ± 0.100 |" in table
