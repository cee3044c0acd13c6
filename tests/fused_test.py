"""The fused MLP meta-gradient (``jmaml.fused``, ``backend="fused"``) against autodiff.

On CPU the Pallas kernel runs in interpret mode: the same kernel body, so these tests check the
hand-derived inner steps, query loss and second-order backward pass (Hessian-vector products)
against ``jax.grad`` through the inner loop (``backend="xla"``), itself checked against finite
differences and the seed's closed forms elsewhere in the suite.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmaml import Batch, Task, init_state, learners, make_loss
from jmaml.core import fused, models
from jmaml.core.meta import make_estimator_step
from jmaml.run import train
from jmaml.tasks import sinusoid


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """On a GPU the default float32 matmul is TF32; the comparisons here are of float32 rounding."""
    with jax.default_matmul_precision("highest"):
        yield


def _tasks(key, num_tasks, n_in, n_out, support, query, dtype):
    """Random regression tasks of any widths (an independent target per task)."""
    ks = jax.random.split(key, 4)
    xs = jax.random.normal(ks[0], (num_tasks, support, n_in), dtype)
    xq = jax.random.normal(ks[1], (num_tasks, query, n_in), dtype)
    a = jax.random.normal(ks[2], (num_tasks, n_in, n_out), dtype)
    target = lambda x: jnp.sin(jnp.einsum("tni,tio->tno", x, a))  # noqa: E731
    return Task(Batch(xs, target(xs)), Batch(xq, target(xq)))


def _both(sizes, activation, k, dtype, *, loss="mse", reduction="mean", num_tasks=6, block_tasks=4,
          alpha=0.05, support=5, query=7, use_pallas=True, kernel=None):
    net = models.mlp(sizes, activation)
    params = jax.tree.map(lambda a: a.astype(dtype), net.init(jax.random.key(k)))
    tasks = _tasks(jax.random.key(100 + k), num_tasks, sizes[0], sizes[-1], support, query, dtype)
    loss_fn = make_loss(net.apply, loss)
    common = {"inner_lr": alpha, "num_inner_steps": k, "reduction": reduction}
    ref = jax.jit(learners.maml(loss_fn, **common).estimate)(params, tasks)
    est = fused.maml_estimator(loss_fn, num_inner_steps=k, reduction=reduction, block_tasks=block_tasks,
                               use_pallas=use_pallas, kernel=kernel)
    got = jax.jit(lambda p, t: est(p, t, inner_lr=alpha))(params, tasks)
    return ref, got


def _assert_close(ref, got, rtol, atol):
    (l0, g0, m0), (l1, g1, m1) = ref, got
    np.testing.assert_allclose(l1, l0, rtol=rtol, atol=atol)
    np.testing.assert_allclose(m1["task_losses"], m0["task_losses"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(m1["pre_adapt_loss"], m0["pre_adapt_loss"], rtol=rtol, atol=atol)
    assert jax.tree.structure(g1) == jax.tree.structure(g0)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol + rtol * scale)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_fused_kernel_equals_autodiff_float32_relu(k):
    """The paper's 1-40-40-1 ReLU MLP, f32; a block size (4) that does not divide the batch (6). With the
    tests below every k from 0 to 5 is covered (2: sse and the GPU body; 4: tanh in float32)."""
    _assert_close(*_both([1, 40, 40, 1], "relu", k, jnp.float32), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5])
def test_fused_kernel_equals_autodiff_float64_tanh(x64, k):
    """tanh (a non-zero second derivative in the HVP), three hidden layers, several outputs, f64:
    equal to autodiff to rounding."""
    _assert_close(*_both([3, 12, 9, 7, 2], "tanh", k, jnp.float64), rtol=1e-11, atol=1e-13)


def test_fused_kernel_float64_relu_sum_of_squares_and_sum_reduction(x64):
    """The seed's loss (sum of squared errors) and reduction (sum over tasks), one hidden layer."""
    _assert_close(*_both([2, 16, 1], "relu", 2, jnp.float64, loss="sse", reduction="sum", block_tasks=3),
                  rtol=1e-11, atol=1e-13)


def test_fused_kernel_float32_tanh_width_and_k0():
    """tanh in float32; k = 0 (no inner step: the query gradient alone)."""
    _assert_close(*_both([1, 24, 1], "tanh", 4, jnp.float32, num_tasks=5, block_tasks=5), rtol=2e-5, atol=1e-6)
    _assert_close(*_both([1, 24, 1], "tanh", 0, jnp.float32), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("activation, k", [("tanh", 3), ("relu", 2)])
def test_the_gpu_kernel_body_task_by_task_equals_autodiff(x64, activation, k):
    """``kernel="loop"``, the body compiled for GPUs (each task's 2-D matmuls in turn, every dimension
    padded to at least 16, the block's gradient summed in the loop), run here in interpret mode."""
    _assert_close(*_both([2, 10, 20, 3], activation, k, jnp.float64, kernel="loop", num_tasks=5, block_tasks=2),
                  rtol=1e-11, atol=1e-13)


def test_the_gpu_kernel_lowers_to_triton_for_cuda():
    """Compiled (``interpret=False``), the kernel lowers through Pallas's Triton backend for CUDA -- checked
    here without a GPU by exporting for the "cuda" platform. (Running it needs the card.)"""
    from jax import export

    net = models.mlp([1, 40, 40, 1])
    est = fused.maml_estimator(make_loss(net.apply, "mse"), num_inner_steps=2, interpret=False)
    fn = jax.jit(lambda p, t: est(p, t, inner_lr=0.01)[:2])
    exported = export.export(fn, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        net.init(jax.random.key(0)), sinusoid.sample_tasks(jax.random.key(1), 256))
    text = exported.mlir_module()
    assert "__gpu$xla.gpu.triton" in text and exported.platforms == ("cuda",)


def test_the_same_mathematics_without_a_kernel(x64):
    """``use_pallas=False``: the hand-written block function as plain XLA gives the same numbers."""
    _assert_close(*_both([2, 10, 10, 1], "tanh", 3, jnp.float64, use_pallas=False), rtol=1e-11, atol=1e-13)


def test_fused_backend_trains_like_autodiff():
    """``learners.maml(..., backend="fused")`` through ``make_estimator_step``: 20 Adam meta-steps on
    sinusoid tasks stay within float32 rounding of the autodiff run, and the metrics are the same."""
    net = models.mlp([1, 40, 40, 1])
    loss_fn = make_loss(net.apply, "mse")
    opt = optax.adam(1e-3)
    states = {}
    for backend in ("xla", "fused"):
        learner = learners.maml(loss_fn, inner_lr=0.01, num_inner_steps=2, backend=backend)
        step = jax.jit(make_estimator_step(opt, lambda p, t, **h: learner.estimate(p, t, **h), inner_lr=0.01))
        state = init_state(net.init(jax.random.key(0)), opt, jax.random.key(1))
        for i in range(20):
            state, metrics = step(state, sinusoid.sample_tasks(jax.random.key(i), 25))
        states[backend] = (state, metrics)
    (s0, m0), (s1, m1) = states["xla"], states["fused"]
    for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert set(m1) == set(m0)
    np.testing.assert_allclose(m1["meta_loss"], m0["meta_loss"], rtol=1e-4)


def test_train_config_backend_fused_runs_a_chunk():
    """``jmaml train --backend fused`` is the algorithm option ``backend``: a compiled chunk of the
    engine gives the autodiff chunk's losses."""
    config = train.TrainConfig(steps=6, log_every=6, checkpoint_every=6, num_inner_steps=1, meta_batch_size=10)
    fused_config = dataclasses.replace(config, algo_options={"backend": "fused"}).validate()
    out = {}
    for c in (config, fused_config):
        _, metrics = train.make_chunk(c)(train.initial_state(c), 6)
        out[c.options.get("backend", "xla")] = metrics["meta_loss"]
    np.testing.assert_allclose(out["fused"], out["xla"], rtol=1e-4)


def test_a_sweep_vmaps_the_kernel_over_inner_rates():
    """α traced and vmapped (as ``jmaml.sweep`` does): each rate's gradient is the autodiff one."""
    net = models.mlp([1, 8, 1])
    loss_fn = make_loss(net.apply, "mse")
    params = net.init(jax.random.key(0))
    tasks = sinusoid.sample_tasks(jax.random.key(1), 5)
    alphas = jnp.array([0.0, 0.01, 0.1])
    est = fused.maml_estimator(loss_fn, num_inner_steps=2)
    got = jax.jit(jax.vmap(lambda a: est(params, tasks, inner_lr=a)[1]))(alphas)
    ref = learners.maml(loss_fn, inner_lr=0.0, num_inner_steps=2)
    for i, a in enumerate(alphas):
        want = ref.estimate(params, tasks, inner_lr=a)[1]
        for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_allclose(y[i], x, rtol=2e-5, atol=1e-7)


# ----- what the fused backend refuses, and how it says so


def _mlp_loss(activation="relu", kind="mse"):
    return make_loss(models.mlp([1, 8, 1], activation).apply, kind)


@pytest.mark.parametrize("loss_fn, error, words", [
    (lambda p, batch: jnp.sum(p * batch.x), TypeError, "jmaml.models.mlp"),
    (make_loss(models.linear().apply, "sse"), TypeError, "supports jmaml.models.mlp only"),
    (make_loss(models.conv4(5).apply, "xent"), TypeError, "supports jmaml.models.mlp only"),
    (_mlp_loss("gelu"), ValueError, "relu, tanh; this mlp uses 'gelu'"),
    (_mlp_loss("relu", "xent"), ValueError, "mse, sse; this loss is 'xent'"),
    (make_loss(models.mixed_precision(models.mlp([1, 8, 1])).apply), ValueError, "precision='bf16'"),
])
def test_fused_refuses_what_it_does_not_compute(loss_fn, error, words):
    with pytest.raises(error, match="backend='fused'") as info:
        learners.maml(loss_fn, inner_lr=0.01, num_inner_steps=1, backend="fused")
    assert words in str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"first_order": True}, "first_order"),
    ({"remat": True}, "remat"),
    ({"max_inner_steps": 5}, "max_inner_steps"),
    ({"inner_optimiser": "adam"}, "inner_optimiser"),
    ({"backend": "triton"}, "backend must be one of xla, fused"),
])
def test_fused_refuses_settings_it_does_not_have(kwargs, words):
    kwargs = {"backend": "fused", **kwargs}
    with pytest.raises(ValueError, match=words):
        learners.maml(_mlp_loss(), inner_lr=0.01, num_inner_steps=1, **kwargs)


def test_fused_names_its_kernel_bodies():
    with pytest.raises(ValueError, match="kernel must be one of block, loop, got 'tiles'"):
        fused.maml_estimator(_mlp_loss(), num_inner_steps=1, kernel="tiles")


def test_fused_names_the_dtypes_and_shapes_it_takes():
    learner = learners.maml(_mlp_loss(), inner_lr=0.01, num_inner_steps=1, backend="fused")
    params = models.mlp([1, 8, 1]).init(jax.random.key(0))
    tasks = sinusoid.sample_tasks(jax.random.key(1), 3)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    with pytest.raises(TypeError, match="dtype float32 or float64"):
        learner.estimate(half, jax.tree.map(lambda a: a.astype(jnp.bfloat16), tasks))
    with pytest.raises(ValueError, match=r"params\[0\] has w \(1, 9\)"):
        learner.estimate(models.mlp([1, 9, 1]).init(jax.random.key(0)), tasks)
    flat = tasks._replace(support=Batch(tasks.support.x[..., 0], tasks.support.y))
    with pytest.raises(ValueError, match=r"tasks.support.x must have shape \(tasks, points, 1\)"):
        learner.estimate(params, flat)


def test_train_config_refuses_fused_for_an_image_model_or_bf16():
    with pytest.raises(ValueError, match="relu, tanh"):
        train.TrainConfig(activation="silu", algo_options={"backend": "fused"}).validate()
    with pytest.raises(ValueError, match="precision='bf16'"):
        train.TrainConfig(precision="bf16", algo_options={"backend": "fused"}).validate()
    with pytest.raises(ValueError, match="backend = 'fused' applies to algo 'maml' only"):
        train.TrainConfig(algo="reptile", num_inner_steps=1, algo_options={"backend": "fused"}).validate()


def test_sweeps_take_the_fused_learner_and_run_sweep_says_why_not():
    """``sweep_learner`` vmaps whole runs of the fused learner over α × β (one program per k) and gets the
    autodiff learner's losses; ``run_sweep`` (a traced k) refuses the fused backend by name."""
    from jmaml.run import sweep

    net = models.mlp([1, 16, 1])
    loss_fn = make_loss(net.apply, "mse")
    grid = sweep.Grid((0.01, 0.05), (1e-3,), (2,), (0,))
    out = {}
    for backend in ("xla", "fused"):
        result = sweep.sweep_learner(
            lambda k, b=backend: learners.maml(loss_fn, inner_lr=0.01, num_inner_steps=k, backend=b),
            sinusoid.distribution(), optax.adam, net.init, grid, steps=4, meta_batch_size=8, log_every=4,
            evaluate=False)
        out[backend] = [row["final_meta_loss"] for row in result["rows"]]
    np.testing.assert_allclose(out["fused"], out["xla"], rtol=1e-4)
    with pytest.raises(ValueError, match="run_sweep traces k .* max_inner_steps is not supported"):
        sweep.run_sweep(train.TrainConfig(steps=2, log_every=2, checkpoint_every=2,
                                          algo_options={"backend": "fused"}), grid)
