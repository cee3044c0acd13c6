r"""The task axis in blocks: a large meta-batch processed a block of tasks at a time.

A meta-gradient is a sum (or mean) over tasks, so it can be computed block by block: ``lax.map`` over
blocks of ``block_size`` tasks, ``vmap`` within each (the learner's own ``estimate``), and the blocks'
losses, gradients and metrics combined. The arithmetic is the same; what changes is the working set —
one block's activations and second-order tangents instead of the whole meta-batch's — which keeps a
large meta-batch in cache on a CPU (measured in ``scripts/bench.py``). The result equals the unblocked
estimate up to the order of floating-point summation (tested in float64).

It applies to every learner whose ``estimate`` combines its tasks by a mean or a sum
(``MetaLearner.reduction``) — all eight built-in ones — and composes with anything that calls a
learner: ``jmaml.fit``, populations (``fit_population`` vmaps over the blocked estimate), traced k and
remat (they are the learner's own), and sharding over a mesh (the blocks are taken within each device's
shard).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jmaml.core._checks import check_positive_int
from jmaml.core.protocols import MetaLearner
from jmaml.engine import distributed


def block_count(num_tasks: int, block_size: int) -> int:
    """How many blocks a meta-batch of ``num_tasks`` makes; ValueError unless ``block_size`` divides it."""
    block_size = check_positive_int(block_size, "meta_batch_block")
    if num_tasks % block_size:
        raise ValueError(f"meta_batch_block={block_size} must divide the meta-batch of {num_tasks} tasks (blocks of "
                         "equal size keep the combination exact)")
    return num_tasks // block_size


def shard_count(mesh: Mesh | None) -> int:
    """The devices a meta-batch is split over (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.devices.size)


def check_block(block: Any, meta_batch_size: int, mesh: Mesh | None = None) -> int | None:
    """A block size as a run uses it: None, or an int dividing the meta-batch -- each device's shard of it,
    with a ``mesh`` (TypeError/ValueError naming it otherwise); a block of the whole shard is None (no
    blocking)."""
    if block is None:
        return None
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"meta_batch_block must be an int, 'auto' or None, got {block!r}")
    shard = meta_batch_size // shard_count(mesh)
    block_count(shard, block)
    return None if block == shard else block


def _combine(values: jax.Array, reduction: str) -> jax.Array:
    """Per-block scalars (leading block axis) combined as the learner combines its tasks."""
    return jnp.sum(values, axis=0) if reduction == "sum" else jnp.mean(values, axis=0)


def blocked(learner: MetaLearner, block_size: int, mesh: Mesh | None = None) -> MetaLearner:
    """``learner`` whose ``estimate`` processes the meta-batch in blocks of ``block_size`` tasks.

    Args:
      learner: any ``MetaLearner`` whose ``estimate`` combines its tasks by ``learner.reduction``.
      block_size: tasks per block; it must divide the meta-batch (a ValueError names both otherwise).
        A block as large as the meta-batch calls ``learner.estimate`` unchanged.
      mesh: the meta-batch is sharded over this mesh's devices (``jmaml.distributed.task_mesh``): the blocks
        are then taken within each device's shard -- ``block_size`` tasks of every device per block, so
        each device walks its own tasks in blocks and no task crosses devices -- and ``block_size`` must
        divide the shard.

    Returns:
      The learner with a blocked ``estimate`` (everything else unchanged). Its loss, gradient,
      ``pre_adapt_loss`` and model state are the blocks' combined by the learner's reduction (their
      mean for ``"mean"``: blocks are of equal size); ``task_losses`` and every other metric with a
      leading axis of the block's tasks are concatenated back to the meta-batch's order; other
      metrics are averaged over blocks.

    Raises:
      ValueError: a block size that is not a positive int, or an unknown reduction.

    Example:
      >>> import jax
      >>> from jmaml import learners, make_loss, models, tasks
      >>> model = models.mlp([1, 8, 1])
      >>> learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
      >>> batch = tasks.sinusoid.distribution().sample(jax.random.key(0), 8)
      >>> params = model.init(jax.random.key(1))
      >>> whole, in_blocks = learner.estimate(params, batch)[0], blocked(learner, 2).estimate(params, batch)[0]
      >>> bool(abs(whole - in_blocks) < 1e-6)
      True
    """
    block_size = check_positive_int(block_size, "meta_batch_block")
    reduction = learner.reduction
    if reduction not in ("mean", "sum"):
        raise ValueError(f"learner {learner.name!r}: reduction must be 'mean' or 'sum' to combine blocks, got "
                         f"{reduction!r}")

    shards = shard_count(mesh)

    def estimate(meta_params, tasks, meta_step=None, **kw):
        num_tasks = jax.tree.leaves(tasks)[0].shape[0]
        if num_tasks % shards:
            raise ValueError(f"a meta-batch of {num_tasks} tasks does not split over the mesh's {shards} devices")
        blocks = block_count(num_tasks // shards, block_size)
        if blocks == 1:
            return learner.estimate(meta_params, tasks, meta_step, **kw)
        width = shards * block_size  # tasks per block: block_size of every device's shard

        def split(a):  # (shards * blocks * block_size, ...) -> (blocks, shards * block_size, ...)
            a = a.reshape(shards, blocks, block_size, *a.shape[1:]).swapaxes(0, 1)
            return a.reshape(blocks, width, *a.shape[3:])

        def one_block(block):
            return learner.estimate(meta_params, distributed.shard_tasks(block, mesh), meta_step, **kw)

        out = jax.lax.map(one_block, jax.tree.map(split, tasks))
        loss, grads, metrics = out[0], out[1], out[2]

        def metric(value):  # a leading block axis, from lax.map
            if value.ndim >= 2 and value.shape[1] == width:  # one value per task: back in the batch's order
                value = value.reshape(blocks, shards, block_size, *value.shape[2:]).swapaxes(0, 1)
                return value.reshape(num_tasks, *value.shape[3:])
            return _combine(value, reduction)
        combined = {name: metric(v) for name, v in metrics.items()}
        result = (_combine(loss, reduction), jax.tree.map(lambda g: _combine(g, reduction).astype(g.dtype), grads),
                  combined)
        if len(out) == 4:  # a model with state: each block updated it from the same start; their mean carries on
            result = (*result, jax.tree.map(lambda s: jnp.mean(s, axis=0).astype(s.dtype), out[3]))
        return result

    return learner._replace(estimate=estimate)
