r"""A fused MAML meta-gradient for MLPs: the whole per-task computation in one Pallas kernel.

For a block of tasks per kernel program this runs the k inner SGD steps on the support set, the
query loss, and the exact second-order meta-gradient -- the backward pass through the inner updates,

.. math::  g_k = \nabla\mathcal{L}_Q(\theta_k), \qquad
           g_i = g_{i+1} - \alpha\, H_S(\theta_i)\, g_{i+1} \quad (i = k-1, \dots, 0),

with every Hessian-vector product :math:`H_S(\theta_i) v` derived by hand for the MLP (the forward
tangent of the layer pre-activations, then the tangent of the backward pass, with the activation's
second derivative) -- while each task's adapted weights and activations stay inside the program.
XLA's autodiff of the same step writes every per-task intermediate to device memory; the large
meta-batch steps are bound by those bytes (BENCHMARKS.md), which is what this kernel avoids.

Scope: ``models.mlp`` with ``relu`` or ``tanh``, the ``"mse"`` or ``"sse"`` loss of ``make_loss``,
plain SGD inner steps at a scalar rate α (which may be traced, so sweeps still vmap over it), a
static k, float32 or float64. Anything else is refused with an error naming what is supported; use
the default ``backend="xla"`` for the rest.

Two kernel bodies share the per-task mathematics (``task_meta_grad``): ``"block"`` runs a block's tasks
at once (vmapped, batched matmuls) and is what Pallas's interpret mode runs on a CPU; ``"loop"`` runs
them one after another with 2-D matmuls, every dimension padded to a power of two of at least 16, as
Triton needs, and is what is compiled for an NVIDIA GPU. The suite checks both in interpret mode
against autodiff, and checks that the GPU body lowers to a Triton kernel for CUDA (by exporting for the
"cuda" platform, which needs no GPU); its speed on a GPU is measured by ``scripts/gpu_check_fused.sh``.

Use it through ``learners.maml(loss_fn, ..., backend="fused")`` (or ``jmaml train --backend fused``);
``maml_value_and_grad`` is the function underneath.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jmaml.core._checks import check_num_steps, check_positive_int, check_task_batch
from jmaml.core.models import MLPSpec
from jmaml.core.types import LossFn, Params, Task

ACTIVATIONS = ("relu", "tanh")
LOSSES = ("mse", "sse")
DTYPES = ("float32", "float64")
DEFAULT_BLOCK_TASKS = 128
KERNELS = ("block", "loop")
LOOP_MIN_WIDTH = 16  # a GPU matmul's smallest side (Triton's dot)


# ---------------------------------------------------------------------------------------------
# What the fused backend accepts


def mlp_of_loss(loss_fn: LossFn) -> tuple[MLPSpec, str]:
    """The MLP and loss kind behind a loss built by ``make_loss(models.mlp(...).apply, kind)``.

    Raises:
      TypeError: a loss jmaml cannot see inside (hand-written, stateful, or another model's).
      ValueError: an MLP with an activation, a loss kind or a precision the kernel does not support.
    """
    built = getattr(loss_fn, "loss_spec", None)
    if built is None:
        raise TypeError("backend='fused' needs a loss built by jmaml.make_loss(jmaml.models.mlp(...).apply, "
                        f"'mse' or 'sse'); got {loss_fn!r}, which it cannot see inside. Use backend='xla' "
                        "(the default) for any other loss or model")
    kind, apply = built
    precision = getattr(apply, "precision", None)
    if precision is not None:
        raise ValueError(f"backend='fused' computes in {' or '.join(DTYPES)}; this model runs in precision="
                         f"{precision!r} (models.mixed_precision). Use backend='xla' for mixed precision")
    spec = getattr(apply, "mlp_spec", None)
    if not isinstance(spec, MLPSpec):
        raise TypeError("backend='fused' supports jmaml.models.mlp only; this loss's model is "
                        f"{getattr(apply, '__qualname__', apply)!r}. Use backend='xla' (the default) for other models")
    if spec.activation not in ACTIVATIONS:
        raise ValueError(f"backend='fused' supports the activations {', '.join(ACTIVATIONS)}; this mlp uses "
                         f"{spec.activation!r}")
    if kind not in LOSSES:
        raise ValueError(f"backend='fused' supports the losses {', '.join(LOSSES)}; this loss is {kind!r}")
    return spec, kind


def _check_params(params: Params, spec: MLPSpec) -> jnp.dtype:
    shapes = [((a, b), (b,)) for a, b in zip(spec.sizes[:-1], spec.sizes[1:])]
    ok = isinstance(params, (list, tuple)) and len(params) == len(shapes) and all(
        isinstance(layer, dict) and set(layer) == {"w", "b"} for layer in params)
    if not ok:
        raise TypeError(f"backend='fused': params must be models.mlp({list(spec.sizes)})'s list of "
                        f"{len(shapes)} {{'w', 'b'}} layers; got {jax.tree.structure(params)}")
    dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(params)}
    for i, (layer, (w_shape, b_shape)) in enumerate(zip(params, shapes)):
        if tuple(layer["w"].shape) != w_shape or tuple(layer["b"].shape) != b_shape:
            raise ValueError(f"backend='fused': params[{i}] has w {tuple(layer['w'].shape)} and b "
                             f"{tuple(layer['b'].shape)}; models.mlp({list(spec.sizes)}) has {w_shape} and {b_shape}")
    if len(dtypes) != 1 or str(next(iter(dtypes))) not in DTYPES:
        raise TypeError(f"backend='fused' supports parameters of dtype {' or '.join(DTYPES)} (all alike); "
                        f"got {sorted(map(str, dtypes))}")
    return next(iter(dtypes))


def _check_tasks(tasks: Task, spec: MLPSpec, dtype: jnp.dtype) -> None:
    check_task_batch(tasks, "tasks")
    for part in ("support", "query"):
        batch = getattr(tasks, part)
        for field, width in (("x", spec.sizes[0]), ("y", spec.sizes[-1])):
            a = getattr(batch, field)
            if a.ndim != 3 or a.shape[-1] != width:
                raise ValueError(f"backend='fused': tasks.{part}.{field} must have shape (tasks, points, {width}) "
                                 f"for models.mlp({list(spec.sizes)}); got {a.shape}")
            if jnp.dtype(a.dtype) != dtype:
                raise TypeError(f"backend='fused': tasks.{part}.{field} has dtype {a.dtype}, the parameters {dtype}; "
                                "they must match")


# ---------------------------------------------------------------------------------------------
# The per-task mathematics: one task, 2-D arrays (points x units). A block of tasks is its vmap (XLA
# then folds the shared θ of the first step into one matmul over all the block's points); the GPU
# kernel runs it task by task, since its matmuls must be 2-D.


def _mm(h: jax.Array, w: jax.Array) -> jax.Array:
    """(n, i) @ (i, o) -> (n, o)."""
    return lax.dot_general(h, w, (((1,), (0,)), ((), ())))


def _mm_t(d: jax.Array, w: jax.Array) -> jax.Array:
    """(n, o) @ (i, o)^T -> (n, i)."""
    return lax.dot_general(d, w, (((1,), (1,)), ((), ())))


def _outer(h: jax.Array, d: jax.Array) -> jax.Array:
    """(n, i)^T @ (n, o) -> (i, o): a weight gradient, summed over the points."""
    return lax.dot_general(h, d, (((0,), (0,)), ((), ())))


def _activation(name: str) -> tuple[Callable, Callable, Callable | None]:
    """σ, σ' and σ'' (None where it is zero), each from the pre-activation z and σ(z)."""
    if name == "relu":
        return (lambda z: jnp.maximum(z, 0), lambda z, h: (z > 0).astype(z.dtype), None)
    return (jnp.tanh, lambda z, h: 1 - h * h, lambda z, h: -2 * h * (1 - h * h))


def _forward(ws, bs, x, act):
    """Pre-activations ``zs`` of every layer and the inputs ``hs`` of every layer (``hs[0] = x``)."""
    hs, zs = [x], []
    for i, (w, b) in enumerate(zip(ws, bs)):
        z = _mm(hs[-1], w) + b[None, :]
        zs.append(z)
        if i < len(ws) - 1:
            hs.append(act(z))
    return hs, zs


def _loss(pred, y, scale):
    """``scale`` is the loss's weight per point: a number, or (points, 1) (0 for padding points)."""
    return jnp.sum(scale * jnp.square(y - pred))


def _backward(ws, hs, zs, y, scale, dact):
    """The task's loss gradient, per layer ``(dW, db)``, and the caches the HVP needs
    (``deltas[i]`` = dL/dz_i, ``dhs[i]`` = dL/dh_i for i >= 1)."""
    n = len(ws)
    delta = 2 * scale * (zs[-1] - y)
    gws, gbs, deltas, dhs = [None] * n, [None] * n, [None] * n, [None] * n
    for i in range(n - 1, -1, -1):
        deltas[i] = delta
        gws[i], gbs[i] = _outer(hs[i], delta), jnp.sum(delta, axis=0)
        if i > 0:
            dhs[i] = _mm_t(delta, ws[i])
            delta = dhs[i] * dact(zs[i - 1], hs[i])
    return gws, gbs, deltas, dhs


def _hvp(ws, hs, zs, deltas, dhs, vws, vbs, scale, dact, ddact):
    """The Hessian of the task's loss times the direction ``(vws, vbs)``, by hand: the forward tangent
    of the pre-activations, then the tangent of ``_backward``."""
    n = len(ws)
    hdots, zdots = [None] * n, [None] * n  # hdots[i]: tangent of hs[i] (hs[0] = x is constant)
    for i in range(n):
        zdot = _mm(hs[i], vws[i]) + vbs[i][None, :]
        if hdots[i] is not None:
            zdot = zdot + _mm(hdots[i], ws[i])
        zdots[i] = zdot
        if i < n - 1:
            hdots[i + 1] = dact(zs[i], hs[i + 1]) * zdot
    ddelta = 2 * scale * zdots[-1]
    hws, hbs = [None] * n, [None] * n
    for i in range(n - 1, -1, -1):
        hws[i] = _outer(hs[i], ddelta)
        if hdots[i] is not None:
            hws[i] = hws[i] + _outer(hdots[i], deltas[i])
        hbs[i] = jnp.sum(ddelta, axis=0)
        if i > 0:
            ddh = _mm_t(ddelta, ws[i]) + _mm_t(deltas[i], vws[i])
            ddelta = ddh * dact(zs[i - 1], hs[i])
            if ddact is not None:
                ddelta = ddelta + dhs[i] * ddact(zs[i - 1], hs[i]) * zdots[i - 1]
    return hws, hbs


def task_meta_grad(ws, bs, support_x, support_y, query_x, query_y, alpha, *, num_inner_steps: int,
                   activation: str, scale_support, scale_query):
    """MAML on one task, written out: its query loss after ``num_inner_steps`` SGD steps at ``alpha``,
    its un-adapted query loss, and its exact meta-gradient.

    ``ws[i]`` (fan_in, fan_out) and ``bs[i]`` (fan_out,) are θ; the data have shape (points, width);
    ``scale_*`` weigh each point's squared error (1/(points x outputs) for MSE, 1 for SSE).

    Returns:
      ``(query_loss, pre_adapt_loss, grad_ws, grad_bs)``.
    """
    act, dact, ddact = _activation(activation)
    pre = _loss(_forward(ws, bs, query_x, act)[1][-1], query_y, scale_query)
    caches = []
    for _ in range(num_inner_steps):
        hs, zs = _forward(ws, bs, support_x, act)
        gws, gbs, deltas, dhs = _backward(ws, hs, zs, support_y, scale_support, dact)
        caches.append((ws, hs, zs, deltas, dhs))
        ws = [w - alpha * g for w, g in zip(ws, gws)]
        bs = [b - alpha * g for b, g in zip(bs, gbs)]
    hs, zs = _forward(ws, bs, query_x, act)
    loss = _loss(zs[-1], query_y, scale_query)
    vws, vbs, _, _ = _backward(ws, hs, zs, query_y, scale_query, dact)
    for ws_i, hs, zs, deltas, dhs in reversed(caches):  # g_i = g_{i+1} - α H_S(θ_i) g_{i+1}
        hws, hbs = _hvp(ws_i, hs, zs, deltas, dhs, vws, vbs, scale_support, dact, ddact)
        vws = [v - alpha * h for v, h in zip(vws, hws)]
        vbs = [v - alpha * h for v, h in zip(vbs, hbs)]
    return loss, pre, vws, vbs


def block_meta_grad(ws, bs, support_x, support_y, query_x, query_y, alpha, **settings):
    """``task_meta_grad`` over a block of tasks (leading axis of the data; θ shared): per-task losses,
    un-adapted losses and gradients (leading axis on each)."""
    one = lambda sx, sy, qx, qy: task_meta_grad(ws, bs, sx, sy, qx, qy, alpha, **settings)  # noqa: E731
    return jax.vmap(one)(support_x, support_y, query_x, query_y)


# ---------------------------------------------------------------------------------------------
# The Pallas kernel: a grid over blocks of tasks


def _kernel(alpha_ref, weight_ref, scale_s_ref, scale_q_ref, sx_ref, sy_ref, qx_ref, qy_ref, *refs,
            num_layers: int, task_loop: bool, **settings):
    params, (loss_ref, pre_ref), grads = refs[:2 * num_layers], refs[2 * num_layers:2 * num_layers + 2], \
        refs[2 * num_layers + 2:]
    ws = [params[2 * i][...] for i in range(num_layers)]
    bs = [params[2 * i + 1][...] for i in range(num_layers)]
    settings = {**settings, "scale_support": scale_s_ref[...], "scale_query": scale_q_ref[...]}
    alpha = alpha_ref[0]
    weight = weight_ref[...]  # each task's share of the meta-objective (0 for padding)
    if not task_loop:  # the block at once (vmapped): interpret mode
        losses, pre, gws, gbs = block_meta_grad(ws, bs, sx_ref[...], sy_ref[...], qx_ref[...], qy_ref[...], alpha,
                                                **settings)
        gws = [jnp.sum(weight[:, None, None] * g, axis=0) for g in gws]
        gbs = [jnp.sum(weight[:, None] * g, axis=0) for g in gbs]
    else:  # task by task with 2-D matmuls, the block's gradient accumulated in the loop's carry (GPU)
        ids = lax.broadcasted_iota(jnp.int32, weight.shape, 0)

        def body(t, carry):
            losses, pre, gws, gbs = carry
            loss, before, gw, gb = task_meta_grad(ws, bs, sx_ref[t], sy_ref[t], qx_ref[t], qy_ref[t], alpha,
                                                  **settings)
            here = ids == t
            share = jnp.sum(jnp.where(here, weight, 0))
            return (jnp.where(here, loss, losses), jnp.where(here, before, pre),
                    [a + share * g for a, g in zip(gws, gw)], [a + share * g for a, g in zip(gbs, gb)])

        zeros = jnp.zeros_like(weight)
        losses, pre, gws, gbs = lax.fori_loop(0, weight.shape[0], body, (
            zeros, zeros, [jnp.zeros_like(w) for w in ws], [jnp.zeros_like(b) for b in bs]))
    loss_ref[...] = losses
    pre_ref[...] = pre
    for i in range(num_layers):
        grads[2 * i][0] = gws[i]
        grads[2 * i + 1][0] = gbs[i]


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << (n - 1).bit_length())


def _pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.pad(a, [(0, s - d) for d, s in zip(a.shape, shape)])


def maml_value_and_grad(params: Params, tasks: Task, *, inner_lr: Any, num_inner_steps: int, spec: MLPSpec,
                        loss: str = "mse", reduction: str = "mean", block_tasks: int | None = None,
                        interpret: bool | None = None, kernel: str | None = None, use_pallas: bool = True):
    """Second-order MAML's meta-loss and meta-gradient for ``models.mlp(spec.sizes, spec.activation)``.

    Args:
      params: the MLP's parameters (float32 or float64).
      tasks: a task batch: support and query ``x`` (tasks, points, sizes[0]), ``y`` (tasks, points, sizes[-1]).
      inner_lr: α (a scalar; may be traced).
      num_inner_steps: k (a static int >= 0).
      spec: the MLP (``models.MLPSpec``).
      loss: ``"mse"`` or ``"sse"`` (as ``make_loss``).
      reduction: ``"mean"`` or ``"sum"`` over tasks.
      block_tasks: tasks per kernel program (default ``min(128, tasks)``, rounded up to a power of two);
        the batch is padded to a multiple of it with tasks of weight 0.
      interpret: run the Pallas kernel in interpret mode; default: on a CPU backend (where Pallas has
        no compiler); else compiled through Triton, for an NVIDIA GPU.
      kernel: the kernel body: ``"block"`` (the block's tasks at once, vmapped; batched matmuls) or
        ``"loop"`` (task by task with 2-D matmuls, what a GPU kernel can compile; every dimension padded
        to at least 16). Default: ``"block"`` in interpret mode, ``"loop"`` compiled.
      use_pallas: False runs the same hand-written mathematics as one plain XLA function (no kernel).

    Returns:
      ``(meta_loss, meta_grads, per_task_query_losses, pre_adapt_loss)``; ``pre_adapt_loss`` is the
      un-adapted query loss reduced like the meta-loss.

    Raises:
      Nothing of its own: it trusts its inputs. ``maml_estimator`` and ``learners.maml(...,
      backend="fused")`` check them (model, loss, dtypes, shapes) and name what is wrong.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jmaml import learners, make_loss, models
      >>> from jmaml.tasks import sinusoid
      >>> net = models.mlp([1, 40, 40, 1])
      >>> params, tasks = net.init(jax.random.key(0)), sinusoid.sample_tasks(jax.random.key(1), 4)
      >>> spec, kind = mlp_of_loss(make_loss(net.apply, "mse"))
      >>> loss, grads, _, _ = maml_value_and_grad(params, tasks, inner_lr=0.01, num_inner_steps=2, spec=spec)
      >>> _, want, _ = learners.maml(make_loss(net.apply, "mse"), inner_lr=0.01, num_inner_steps=2).estimate(
      ...     params, tasks)
      >>> max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want))) < 1e-5
      True
    """
    num_tasks = tasks.support.x.shape[0]
    num_layers = len(spec.sizes) - 1
    dtype = jnp.dtype(params[0]["w"].dtype)
    per_point = lambda batch: (1.0 / (batch.y.shape[1] * batch.y.shape[2])) if loss == "mse" else 1.0  # noqa: E731
    share = 1.0 / num_tasks if reduction == "mean" else 1.0
    alpha = jnp.asarray(inner_lr, dtype).reshape((1,))
    data: tuple[jax.Array, ...] = (tasks.support.x, tasks.support.y, tasks.query.x, tasks.query.y)
    if not use_pallas:
        ws, bs = [layer["w"] for layer in params], [layer["b"] for layer in params]
        sx, sy, qx, qy = data
        losses, pre, gws, gbs = block_meta_grad(
            ws, bs, sx, sy, qx, qy, alpha[0], num_inner_steps=num_inner_steps, activation=spec.activation,
            scale_support=per_point(tasks.support), scale_query=per_point(tasks.query))
        grads = [{"w": jnp.sum(gw, 0) * share, "b": jnp.sum(gb, 0) * share} for gw, gb in zip(gws, gbs)]
    else:
        from jax.experimental import pallas as pl

        if interpret is None:
            interpret = jax.default_backend() == "cpu"
        kernel = kernel or ("block" if interpret else "loop")
        # The batch is padded to whole blocks with tasks of weight 0 in the meta-objective. For the GPU body
        # every other dimension is padded too, to a power of two of at least 16 (Triton's 2-D dots): zero
        # inputs, zero weights and biases for the extra units (relu(0) = tanh(0) = 0, so they stay zero and
        # pass nothing on), points of weight 0 in the losses. Exact: the tests run it padded.
        size = (lambda n: _pow2(n, LOOP_MIN_WIDTH)) if kernel == "loop" else (lambda n: n)  # noqa: E731
        block = _pow2(min(block_tasks or DEFAULT_BLOCK_TASKS, num_tasks))
        num_blocks = -(-num_tasks // block)
        padded = num_blocks * block
        widths = [size(n) for n in spec.sizes]
        flat = []
        for layer, fan_in, fan_out in zip(params, widths[:-1], widths[1:]):
            flat += [_pad_to(layer["w"], (fan_in, fan_out)), _pad_to(layer["b"], (fan_out,))]
        data = tuple(_pad_to(a, (padded, size(a.shape[1]), size(a.shape[2]))) for a in data)

        def point_scale(batch):  # the loss's weight of each (padded) point
            n = batch.x.shape[1]
            return _pad_to(jnp.full((n, 1), per_point(batch), dtype), (size(n), 1))

        weight = _pad_to(jnp.full((num_tasks,), share, dtype), (padded,))
        scales = (point_scale(tasks.support), point_scale(tasks.query))

        def tasks_spec(a):
            return pl.BlockSpec((block, *a.shape[1:]), lambda i, nd=a.ndim: (i,) + (0,) * (nd - 1))

        def whole(a):
            return pl.BlockSpec(a.shape, lambda i, nd=a.ndim: (0,) * nd)

        def per_block(a):
            return pl.BlockSpec((1, *a.shape), lambda i, nd=a.ndim: (i,) + (0,) * nd)

        out_shape = [jax.ShapeDtypeStruct((padded,), dtype)] * 2 + [
            jax.ShapeDtypeStruct((num_blocks, *a.shape), dtype) for a in flat]
        out_specs = [tasks_spec(weight)] * 2 + [per_block(a) for a in flat]
        in_specs = [whole(alpha), tasks_spec(weight), *map(whole, scales), *map(tasks_spec, data), *map(whole, flat)]
        extra: dict[str, Any] = {}
        if not interpret:  # compiled: for an NVIDIA GPU, through Triton
            from jax.experimental.pallas import triton as plt

            extra["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=1)
        call = pl.pallas_call(
            lambda *refs: _kernel(*refs, num_layers=num_layers, task_loop=kernel == "loop",
                                  num_inner_steps=num_inner_steps, activation=spec.activation),
            out_shape=out_shape, grid=(num_blocks,), in_specs=in_specs, out_specs=out_specs, interpret=interpret,
            **extra)
        losses, pre, *partials = call(alpha, weight, *scales, *data, *flat)
        losses, pre = losses[:num_tasks], pre[:num_tasks]
        sums = [jnp.sum(p, axis=0) for p in partials]
        grads = [{"w": sums[2 * i][:fan_in, :fan_out], "b": sums[2 * i + 1][:fan_out]}
                 for i, (fan_in, fan_out) in enumerate(zip(spec.sizes[:-1], spec.sizes[1:]))]
    reduce = jnp.mean if reduction == "mean" else jnp.sum
    return reduce(losses), grads, losses, reduce(pre)


def maml_estimator(loss_fn: LossFn, *, num_inner_steps: int, reduction: str = "mean", first_order: bool = False,
                   max_inner_steps: int | None = None, inner_optimiser: Any = None, remat: bool = False,
                   block_tasks: int | None = None, interpret: bool | None = None, kernel: str | None = None,
                   use_pallas: bool = True) -> Callable[..., Any]:
    """The fused backend as a MAML estimator: ``estimate(params, tasks, *, inner_lr, meta_step=None)
    -> (loss, grads, metrics)`` (the interface of ``jmaml.meta.maml_estimator``).

    Raises:
      TypeError/ValueError: a loss that is not ``make_loss(models.mlp(...).apply, "mse"/"sse")`` with a
        relu or tanh MLP, or a setting the kernel does not have (first order, a traced k, an inner
        optimiser, remat), each naming what is supported.
    """
    spec, kind = mlp_of_loss(loss_fn)
    k = check_num_steps(num_inner_steps, "num_inner_steps")
    unsupported = {"first_order": first_order, "max_inner_steps": max_inner_steps is not None,
                   "inner_optimiser": inner_optimiser is not None, "remat": remat}
    for name, given in unsupported.items():
        if given:
            raise ValueError(f"backend='fused' computes second-order MAML with plain SGD inner steps and a fixed k; "
                             f"{name} is not supported with it (use backend='xla')")
    if block_tasks is not None:
        check_positive_int(block_tasks, "block_tasks")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")

    def estimate(params: Params, tasks: Task, *, inner_lr: Any, meta_step: Any = None, num_inner_steps: Any = None,
                 model_state: Any = None):
        if num_inner_steps is not None or model_state is not None:
            raise ValueError("backend='fused' takes no per-call num_inner_steps or model_state")
        dtype = _check_params(params, spec)
        _check_tasks(tasks, spec, dtype)
        loss, grads, per_task, pre = maml_value_and_grad(
            params, tasks, inner_lr=inner_lr, num_inner_steps=k, spec=spec, loss=kind, reduction=reduction,
            block_tasks=block_tasks, interpret=interpret, kernel=kernel, use_pallas=use_pallas)
        return loss, grads, {"task_losses": per_task, "pre_adapt_loss": pre}

    return estimate

