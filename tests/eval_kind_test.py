"""Evaluation knows its metric's kind (a loss or an accuracy), on a user's own tasks and models:
nothing dropped or averaged wrongly; a pretrained baseline for any task family."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmaml
from jmaml import Batch, Task, TaskDistribution, learners, make_loss
from jmaml.core import models
from jmaml.run import evaluate


def _halfplanes(key, num_tasks, num_support=10, num_query=6):
    """A user's own 2-way family: label = which side of a random line through 0 a point lies on."""
    k_w, k_x = jax.random.split(key)
    w = jax.random.normal(k_w, (num_tasks, 2))
    x = jax.random.normal(k_x, (num_tasks, num_support + num_query, 2))
    y = (jnp.einsum("tnd,td->tn", x, w) > 0).astype(jnp.int32)
    return Task(Batch(x[:, :num_support], y[:, :num_support]), Batch(x[:, num_support:], y[:, num_support:]))


def _accuracy(apply):
    return lambda params, batch: jnp.mean(jnp.argmax(apply(params, batch.x), axis=-1) == batch.y)


def test_accuracy_evaluation_never_drops_a_task_that_starts_at_zero():
    model = models.mlp([2, 2])
    # the user's own family: only metric_name says what the metric is, as before this fix
    dist = TaskDistribution(sample=_halfplanes, heldout=_halfplanes, make_metric=_accuracy, name="halfplanes",
                            metric_name="accuracy")
    params = model.init(jax.random.key(1))
    learner = learners.maml(make_loss(model.apply, "xent"), inner_lr=2.0, num_inner_steps=1)
    report = evaluate.evaluate(learner, params, dist, apply=model.apply, num_tasks=200, num_steps=3)["all"]
    # the oracle: every task's accuracy computed one at a time, no task left out
    tasks = _halfplanes(jax.random.key(evaluate.EVAL_SEED), 200)
    loss = make_loss(model.apply, "xent")
    acc = _accuracy(model.apply)
    # (one task per call, each compiled once: an eager adapt per task compiles a scan per call)
    one_before = jax.jit(lambda query: acc(params, query))
    one_after3 = jax.jit(lambda support, query: acc(jmaml.adapt(loss, params, support, inner_lr=2.0, num_steps=3),
                                                    query))
    task = lambda j, data: jax.tree.map(lambda a: a[j], data)  # noqa: E731
    before = [float(one_before(task(j, tasks.query))) for j in range(200)]
    after3 = [float(one_after3(task(j, tasks.support), task(j, tasks.query))) for j in range(200)]
    assert min(before) == 0.0 and max(after3) > 0.0  # the false signal's situation: tasks start at 0 and improve
    assert report["diverged"] == [0, 0, 0, 0] and report["higher_is_better"] is True
    assert report["mean"][0] == pytest.approx(np.mean(before), abs=1e-6)
    assert report["mean"][3] == pytest.approx(np.mean(after3), abs=1e-6)
    assert report["mean_all"] == pytest.approx(report["mean"])
    # the rule that dropped them (a loss's "1000x its un-adapted value") is refused for a score
    with pytest.raises(ValueError, match="diverged_ratio=1000.0 applies to a loss"):
        evaluate.evaluate(learner, params, dist, apply=model.apply, num_tasks=20, num_steps=1, diverged_ratio=1000.0)


def test_the_old_rule_would_have_dropped_them():
    scores = np.array([[0.0, 0.4], [0.5, 0.6], [0.0, 0.0]])
    assert evaluate.summarize(scores)["diverged"] == [0, 1]  # as a loss: 0 -> 0.4 is "exploding"
    as_score = evaluate.summarize(scores, None, higher_is_better=True)
    assert as_score["diverged"] == [0, 0] and as_score["mean"] == pytest.approx([0.5 / 3, 1.0 / 3])


def test_a_loss_reports_the_mean_over_all_tasks_beside_the_kept_ones():
    losses = np.array([[1.0, 0.5], [1.0, 5.0e3], [1.0, 0.7]])
    s = evaluate.summarize(losses)
    assert s["diverged"] == [0, 1] and s["mean"][1] == pytest.approx(0.6)
    assert s["mean_all"][1] == pytest.approx((0.5 + 5.0e3 + 0.7) / 3)


def test_metric_kind_from_the_distribution():
    from jmaml.core.protocols import metric_higher_is_better
    assert metric_higher_is_better(TaskDistribution(sample=_halfplanes, metric_name="accuracy"))
    assert not metric_higher_is_better(TaskDistribution(sample=_halfplanes, metric_name="mse"))
    assert metric_higher_is_better(TaskDistribution(sample=_halfplanes, metric_name="hits", higher_is_better=True))
    assert jmaml.tasks.sinusoid.distribution().higher_is_better is False


def test_evaluate_refuses_a_single_task_and_an_absurd_count():
    model = models.mlp([1, 4, 1])
    learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
    dist, params = jmaml.tasks.sinusoid.distribution(), model.init(jax.random.key(0))
    with pytest.raises(ValueError, match="num_tasks=1: a mean with a 95% confidence interval needs at least 2"):
        evaluate.evaluate(learner, params, dist, apply=model.apply, num_tasks=1)
    with pytest.raises(ValueError, match="num_tasks=1000000000 is more than MAX_EVAL_TASKS"):
        evaluate.evaluate(learner, params, dist, apply=model.apply, num_tasks=10**9, batch_size=1000)
    assert np.isnan(evaluate.summarize(np.array([[1.0, 2.0], [1.0, np.nan]]))["ci95"][1])  # one task left: undefined


def test_evaluate_shows_progress_over_many_chunks(capsys):
    model = models.mlp([1, 4, 1])
    learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
    evaluate.evaluate(learner, model.init(jax.random.key(0)), jmaml.tasks.sinusoid.distribution(), apply=model.apply,
                      num_tasks=24, batch_size=2, num_steps=1)
    err = capsys.readouterr().err
    assert "evaluate: 12/12 chunks, 24 tasks" in err and "s left" in err


@pytest.mark.parametrize("family", ["halfplanes", "sinusoid"])
def test_a_pretrained_baseline_for_any_task_distribution(tmp_path, family):
    if family == "halfplanes":
        model = models.mlp([2, 8, 2])
        dist = TaskDistribution(sample=_halfplanes, heldout=_halfplanes, make_metric=_accuracy, name="halfplanes",
                                metric_name="accuracy")
        loss = make_loss(model.apply, "xent")
    else:
        model = models.mlp([1, 16, 1])
        dist = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5)
        loss = make_loss(model.apply, "mse")
    out = evaluate.pretrained_baseline(loss, dist, model.init(jax.random.key(0)), steps=30, meta_batch_size=8,
                                       apply=model.apply, candidates=(0.001, 0.05, 0.5), num_tasks=40,
                                       num_steps=3, run=str(tmp_path / "base"),
                                       log=jmaml.Logging(every=10, progress=False))
    higher = family == "halfplanes"
    pick = max if higher else min
    assert out["inner_lr"] == pick((0.001, 0.05, 0.5), key=lambda lr: out["scores"][str(lr)])
    # the scores are the validation tasks' metric (a separate key), and the results are evaluate's own
    learner = learners.maml(loss, inner_lr=0.5, num_inner_steps=0)
    val = evaluate.evaluate(learner, out["params"], dist, apply=model.apply, num_tasks=40, num_steps=3,
                            key=evaluate.VALIDATION_SEED, hyper={"inner_lr": out["inner_lr"]})["all"]
    assert out["scores"][str(out["inner_lr"])] == pytest.approx(np.mean(val["mean_all"][1:]), rel=1e-6)
    test = evaluate.evaluate(learner, out["params"], dist, apply=model.apply, num_tasks=40, num_steps=3,
                             hyper={"inner_lr": out["inner_lr"]})["all"]
    assert out["results"]["all"]["mean"] == pytest.approx(test["mean"], rel=1e-6)
    assert (tmp_path / "base" / "pretrained.ckpt.npz").exists()  # trained by the engine: a run like any other
