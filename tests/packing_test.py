"""Task-packed matmuls (issue 33, item 3): where the parameters are shared across tasks -- θ before adaptation,
the first inner step's forward pass and the backward pass through θ -- the meta-step multiplies the whole task
batch in one matmul ([B, K, n] . [n, m], which XLA lowers as one [B*K, n] . [n, m] GEMM), not B small ones. It
is jax.vmap's own batching rule for a dot with one unbatched operand, so every learner built on vmap over tasks
gets it; these tests hold it there (each learner's compiled step read from its jaxpr) and check that the packed
step equals the unpacked one -- each task alone, its own [K, n] . [n, m] products -- in float64."""

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest

from jmaml import Batch, Task, learners, make_loss, maml_value_and_grad, task_objective
from jmaml.core import models
from jmaml.core._util import enable_x64
from jmaml.run import recipes, train
from jmaml.run.config import TrainConfig

B = 7  # tasks: a size no other axis of the step has


def _dots(jaxpr, out):
    """Every dot_general in ``jaxpr`` and the jaxprs inside it: (operand shapes, has batch dimensions)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            out.append((tuple(v.aval.shape for v in eqn.invars), bool(lhs_batch)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    _dots(sub.jaxpr, out)
                elif isinstance(sub, jcore.Jaxpr):
                    _dots(sub, out)
    return out


@pytest.mark.parametrize("algo", learners.names())
def test_every_learners_step_multiplies_the_shared_weights_once_for_all_tasks(algo):
    """In each learner's meta-step on the sinusoid MLP 1-40-40-1, every product of a task-batched activation
    [B, K, n] with a weight matrix that is the same for all tasks is one packed dot (no batch dimension), and
    the pre-adaptation forward pass makes at least one per layer. The per-task products that remain are those
    of per-task parameters (θ' after adaptation, the weight gradients xᵀδ)."""
    config = TrainConfig(algo=algo, meta_batch_size=B, steps=1, log_every=1, checkpoint_every=1,
                         pretrain=False).validate()
    chunk = train.make_chunk(config)
    jaxpr = jax.make_jaxpr(lambda s: chunk(s, 1))(recipes.initial_state(config, "maml"))
    dots = _dots(jaxpr.jaxpr, [])
    shared = [(shapes, batched) for shapes, batched in dots
              if len(shapes[0]) == 3 and shapes[0][0] == B and len(shapes[1]) == 2]
    assert all(not batched for _, batched in shared), [s for s, b in shared if b]
    layers = {(1, 40), (40, 40), (40, 1)}
    packed_weights = {shapes[1] for shapes, _ in shared}
    if algo != "cavia":  # CAVIA's first layer takes [x, context]: (1 + context, 40)
        assert layers <= packed_weights, (algo, packed_weights)
    assert len(shared) >= 3, (algo, dots)


def test_the_packed_meta_gradient_equals_each_task_alone_in_float64():
    """vmap's packed products give the meta-gradient that B separate per-task computations give (each task its
    own [K, n] . [n, m] matmuls, averaged by hand), to float64 round-off, for second-order MAML with 2 steps."""
    with enable_x64():
        model = models.mlp([1, 40, 40, 1])
        loss = make_loss(model.apply, "mse")
        params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0)))
        rng = np.random.default_rng(0)
        xs, xq = rng.uniform(-5, 5, (B, 10, 1)), rng.uniform(-5, 5, (B, 10, 1))
        amp = rng.uniform(0.1, 5, (B, 1, 1))
        tasks = Task(Batch(jnp.asarray(xs), jnp.asarray(amp * np.sin(xs))),
                     Batch(jnp.asarray(xq), jnp.asarray(amp * np.sin(xq))))
        loss_packed, grad_packed, _ = maml_value_and_grad(loss, params, tasks, inner_lr=0.01, num_inner_steps=2)
        def one(p, task):
            return task_objective(loss, p, task, inner_lr=0.01, num_inner_steps=2)

        alone = [jax.value_and_grad(one)(params, jax.tree.map(lambda a, i=i: a[i], tasks)) for i in range(B)]
        assert grad_packed[0]["w"].dtype == jnp.float64
        np.testing.assert_allclose(float(loss_packed), np.mean([float(v) for v, _ in alone]), rtol=1e-13)
        for leaf, *per_task in zip(jax.tree.leaves(grad_packed), *(jax.tree.leaves(g) for _, g in alone)):
            np.testing.assert_allclose(np.asarray(leaf), np.mean(np.stack(per_task), axis=0), rtol=1e-11,
                                       atol=1e-14)
