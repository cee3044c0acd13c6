"""The task axis in blocks (jmaml.blocking, fit(meta_batch_block=)): the blocked estimate equals the whole
meta-batch's for every learner, in float64; blocked runs resume bitwise; "auto" keeps its choice on resume."""

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmaml
from jmaml import learners, make_loss
from jmaml.core import models
from jmaml.engine import blocking, checkpoint

ALGOS = ("maml", "fomaml", "anil", "metasgd", "mamlpp", "imaml", "reptile", "cavia")


def _learner(name, reduction="mean"):
    if name == "cavia":
        model = learners.with_context(models.mlp([3, 8, 1]), 2)
        return model, learners.cavia(make_loss(model.apply, "mse"), inner_lr=0.1, num_inner_steps=2, num_context=2,
                                     reduction=reduction)
    model = models.mlp([1, 8, 8, 1])
    return model, learners.make(name, make_loss(model.apply, "mse"), inner_lr=0.02, num_inner_steps=2,
                                reduction=reduction) if name != "reptile" else \
        learners.make(name, make_loss(model.apply, "mse"), inner_lr=0.02, num_inner_steps=2)


@pytest.mark.parametrize("name", ALGOS)
def test_the_blocked_gradient_equals_the_whole_batchs_in_float64(x64, name):
    model, learner = _learner(name)
    mp = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), learner.init(model.init(jax.random.key(0))))
    tasks = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                         jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5).sample(jax.random.key(1), 12))
    whole = learner.estimate(mp, tasks, jnp.asarray(3))
    for size in (4, 3, 1):
        parts = blocking.blocked(learner, size).estimate(mp, tasks, jnp.asarray(3))
        assert float(parts[0]) == pytest.approx(float(whole[0]), rel=1e-13)
        for a, b in zip(jax.tree.leaves(parts[1]), jax.tree.leaves(whole[1])):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(parts[2]["task_losses"], whole[2]["task_losses"], rtol=1e-13)
        # the un-adapted loss is measured on evenly spaced tasks of each block: the mean of the whole-batch
        # learner's value on those subsets
        stride = jmaml.meta.pre_adapt_stride(size)
        per_block = [learner.estimate(mp, jax.tree.map(lambda a: a[b * size:(b + 1) * size:stride], tasks),
                                      jnp.asarray(3))[2]["pre_adapt_loss"] for b in range(12 // size)]
        assert float(parts[2]["pre_adapt_loss"]) == pytest.approx(float(np.mean(per_block)), rel=1e-13)


@pytest.mark.parametrize("name", ALGOS)
@pytest.mark.parametrize("reduction", ("mean", "sum"))
def test_the_un_adapted_loss_is_measured_on_a_subsample_of_the_batch(x64, name, reduction):
    """Every other task of a meta-batch of 20 (PRE_ADAPT_TASKS = 8), against a loop over tasks at the
    un-adapted parameters (CAVIA: a zero context; Reptile: all of a task's data), scaled to the batch for a
    sum."""
    if name == "reptile" and reduction == "sum":
        pytest.skip("Reptile's estimate is a mean")
    model, learner = _learner(name, reduction)
    loss_fn = make_loss(model.apply, "mse")
    mp = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), learner.init(model.init(jax.random.key(0))))
    theta = mp.params if hasattr(mp, "params") else mp
    if name == "cavia":
        theta = mp._replace(context=jnp.zeros_like(mp.context))
    n, measured = 20, range(0, 20, 2)
    assert jmaml.meta.pre_adapt_stride(n) == 2 and jmaml.meta.pre_adapt_stride(15) == 1
    tasks = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                         jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5).sample(jax.random.key(2), n))
    losses = []
    for i in measured:
        q = jax.tree.map(lambda a: a[i], tasks.query)
        if name == "reptile":
            s = jax.tree.map(lambda a: a[i], tasks.support)
            q = type(q)(jnp.concatenate([s.x, q.x]), jnp.concatenate([s.y, q.y]))
        losses.append(float(loss_fn(theta, q)))
    expected = np.mean(losses) if reduction == "mean" else np.sum(losses) * n / len(losses)
    got = learner.estimate(mp, tasks, jnp.asarray(0))[2]["pre_adapt_loss"]
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_a_sum_reduction_sums_its_blocks(x64):
    model, learner = _learner("maml", reduction="sum")
    assert learner.reduction == "sum"
    mp = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(0)))
    tasks = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                         jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5).sample(jax.random.key(1), 8))
    whole, parts = learner.estimate(mp, tasks), blocking.blocked(learner, 2).estimate(mp, tasks)
    assert float(parts[0]) == pytest.approx(float(whole[0]), rel=1e-13)


def test_a_model_with_state_and_traced_k_through_blocks(x64):
    model = models.mlp_batchnorm([1, 8, 1])
    learner = learners.maml(make_loss(model.apply, "mse", stateful=True), inner_lr=0.05, num_inner_steps=2,
                            max_inner_steps=3)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(0)))
    state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if a.dtype == jnp.float32 else a, model.init_state())
    tasks = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                         jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5).sample(jax.random.key(1), 8))
    k = jnp.asarray(3)
    whole = learner.estimate(params, tasks, None, model_state=state, num_inner_steps=k)
    parts = blocking.blocked(learner, 4).estimate(params, tasks, None, model_state=state, num_inner_steps=k)
    assert float(parts[0]) == pytest.approx(float(whole[0]), rel=1e-13)
    for a, b in zip(jax.tree.leaves(parts[3]), jax.tree.leaves(whole[3])):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_a_block_that_does_not_divide_the_batch_is_named():
    _, learner = _learner("maml")
    with pytest.raises(ValueError, match="meta_batch_block=3 must divide the meta-batch of 8 tasks"):
        blocking.blocked(learner, 3).estimate(models.mlp([1, 8, 8, 1]).init(jax.random.key(0)),
                                              jmaml.tasks.sinusoid.distribution().sample(jax.random.key(1), 8))
    with pytest.raises(ValueError, match="meta_batch_block must be"):
        blocking.blocked(learner, 0)


def _fit(run_dir, block, steps=20, **run):
    model, learner = _learner("maml")
    return jmaml.fit(learner, jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5), optax.adam(1e-3),
                     model.init(jax.random.key(0)), steps=steps, meta_batch_size=8, key=2, meta_batch_block=block,
                     run=jmaml.RunDir(str(run_dir), checkpoint_every=10, **run),
                     log=jmaml.Logging(every=10, progress=False, stream=io.StringIO()))


def test_a_blocked_run_resumes_bitwise_and_its_block_is_part_of_the_fingerprint(tmp_path):
    straight = _fit(tmp_path / "a", 4)
    with pytest.raises(jmaml.Interrupted):
        model, learner = _learner("maml")
        jmaml.fit(learner, jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5), optax.adam(1e-3),
                  model.init(jax.random.key(0)), steps=20, meta_batch_size=8, key=2, meta_batch_block=4,
                  run=jmaml.RunDir(str(tmp_path / "b"), checkpoint_every=10),
                  log=jmaml.Logging(every=10, progress=False), stop_at_step=10)
    resumed = _fit(tmp_path / "b", 4, resume=True)
    for u, v in zip(checkpoint.host_leaves(straight), checkpoint.host_leaves(resumed)):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match="meta_batch_block"):
        _fit(tmp_path / "a", 2, steps=30, resume=True)
    whole = _fit(tmp_path / "c", None)
    for u, v in zip(jax.tree.leaves(whole.params), jax.tree.leaves(straight.params)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)  # the same training, to float32 round-off


def test_auto_keeps_its_choice_on_resume_whatever_the_load(tmp_path, monkeypatch):
    from jmaml.engine import loop as engine
    with pytest.raises(jmaml.Interrupted):
        model, learner = _learner("maml")
        jmaml.fit(learner, jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5), optax.adam(1e-3),
                  model.init(jax.random.key(0)), steps=20, meta_batch_size=8, key=2, meta_batch_block="auto",
                  run=jmaml.RunDir(str(tmp_path / "run"), checkpoint_every=10),
                  log=jmaml.Logging(every=10, progress=False, stream=io.StringIO()), stop_at_step=10)
    header = checkpoint.read_header(os.path.join(tmp_path, "run", "maml.ckpt.npz"))
    chosen = header["extra"]["fit"]["settings"].get("meta_batch_block")

    def no_timing(*args, **kwargs):  # a resume must not measure again (the load may differ now)
        raise AssertionError("timed again on resume")

    monkeypatch.setattr(engine, "block_candidates", no_timing)
    resumed = _fit(tmp_path / "run", "auto", resume=True)
    assert int(resumed.step) == 20
    again = checkpoint.read_header(os.path.join(tmp_path, "run", "maml.ckpt.npz"))
    assert again["extra"]["fit"]["settings"].get("meta_batch_block") == chosen


def test_auto_keeps_the_whole_batch_unless_a_block_earns_its_place():
    """A block is kept only when it is CALIBRATION_MARGIN times faster than the whole batch: a block that
    timed 2% faster (noise on a short chunk: measured here, blocks of 8 at B = 1000, k = 1 chosen and then
    10% slower) does not make the run take the other program."""
    from jmaml.engine.loop import CALIBRATION_MARGIN, pick_block
    assert CALIBRATION_MARGIN > 1
    assert pick_block({1000: 10.0, 200: 9.8, 8: 9.9}, 1000) == 1000
    assert pick_block({1000: 10.0, 200: 9.0, 8: 9.5}, 1000) == 200
    assert pick_block({1000: 10.0, 200: 11.0}, 1000) == 1000
    assert pick_block({1000: 10.0, 200: 9.0, 100: 9.0}, 1000) == 200  # a tie between blocks: the larger


def test_a_population_of_a_blocked_learner_equals_the_whole_batchs():
    """Blocks compose with the sweep's population axis: fit_population vmaps over the blocked estimate."""
    from jmaml.engine.population import fit_population, point
    model, learner = _learner("maml")
    dist = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5)
    points = {"inner_lr": [0.01, 0.03], "seed": [0, 1]}
    run = lambda lrn: fit_population(lrn, dist, optax.adam(1e-3), model.init, points, steps=10, meta_batch_size=8,
                                     key=4, log=jmaml.Logging(every=10, progress=False, stream=io.StringIO()))
    whole, parts = run(learner), run(blocking.blocked(learner, 2))
    by_option = fit_population(learner, dist, optax.adam(1e-3), model.init, points, steps=10, meta_batch_size=8, key=4,
                               meta_batch_block=2, log=jmaml.Logging(every=10, progress=False, stream=io.StringIO()))
    for u, v in zip(jax.tree.leaves(by_option.points.params), jax.tree.leaves(parts.points.params)):
        np.testing.assert_array_equal(u, v)
    for i in range(2):
        for u, v in zip(jax.tree.leaves(point(parts, i).params), jax.tree.leaves(point(whole, i).params)):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


def test_the_divergence_stop_still_fires_with_blocks(tmp_path):
    """An exploding inner loop (the seed's -1515.48, at scale) is stopped when the meta-batch runs in blocks."""
    model = models.mlp([1, 8, 8, 1])
    learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=50.0, num_inner_steps=2)
    with pytest.raises(jmaml.DivergenceError, match="diverged"):
        jmaml.fit(learner, jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5), optax.adam(1e-3),
                  model.init(jax.random.key(0)), steps=20, meta_batch_size=8, meta_batch_block=2,
                  log=jmaml.Logging(every=10, progress=False, stream=io.StringIO()))
