r"""``check_meta_gradient``: is a learner's meta-gradient the gradient of its own meta-loss?

A researcher who writes a learner wants to know its ``estimate`` is right before training with it.
This compares the gradient ``estimate`` returns with central finite differences of the loss it
returns, in float64, along random directions (and, for small meta-parameters, every coordinate),
and reports the relative error per leaf. The finite differences share no code path with the
gradient: they only call ``estimate`` for its loss.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmaml._util import enable_x64
from jmaml.engine import check_learner
from jmaml.protocols import MetaLearner


def _to64(tree: Any) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                        else jnp.asarray(a), tree)


def check_meta_gradient(learner: MetaLearner, meta_params: Any, tasks: Any, *, meta_step: Any = None,
                        eps: float = 1e-6, num_directions: int = 4, max_coordinates: int = 64, seed: int = 0,
                        rtol: float = 1e-5) -> dict[str, Any]:
    r"""Compares ``learner.estimate``'s gradient with float64 central finite differences of its loss.

    For every leaf: the directional derivative along random unit directions (and along each
    coordinate for leaves of at most ``max_coordinates`` entries), :math:`(L(θ + εv) − L(θ − εv))/2ε`,
    against :math:`\langle g, v\rangle`; the relative error is
    :math:`|fd − \langle g,v\rangle| / \max(|fd|, |\langle g,v\rangle|, 10^{-12})`, its maximum per leaf.

    Args:
      learner: the learner to check (``learner.estimate(meta_params, tasks, meta_step)``).
      meta_params: where to check (e.g. ``learner.init(params)``); cast to float64.
      tasks: a task batch (leading task axis); floating leaves cast to float64.
      eps: the finite-difference step.
      num_directions: random directions per leaf.
      max_coordinates: leaves up to this size are also checked coordinate by coordinate.
      seed: the directions' seed.
      rtol: the pass threshold on the largest relative error.

    Returns:
      ``{"ok": bool, "max_rel_error": float, "per_leaf": {path: max rel. error}, "exact_gradient":
      learner.exact_gradient, "note": str}``. For a learner that does not claim an exact gradient
      (Reptile, FOMAML, iMAML ...) the errors are reported but ``ok`` is None, and the note says so.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jmaml import check_meta_gradient, learners, make_loss, models, tasks
      >>> loss = make_loss(models.linear().apply, "sse")
      >>> report = check_meta_gradient(learners.maml(loss, inner_lr=0.1, num_inner_steps=2),
      ...                              jnp.array(1.0), tasks.seed.meta_tasks())
      >>> report["ok"]
      True

    Raises:
      ValueError: the learner's gradient does not have the structure of its meta-parameters.
    """
    check_learner(learner)
    with enable_x64():
        mp = _to64(meta_params)
        batch = _to64(tasks)
        loss_fn = jax.jit(lambda p: learner.estimate(p, batch, meta_step)[0])
        _, grads, _ = jax.jit(lambda p: learner.estimate(p, batch, meta_step))(mp)
        leaves, treedef = jax.tree.flatten(mp)
        grad_leaves = jax.tree.leaves(grads)
        if len(grad_leaves) != len(leaves):
            raise ValueError(f"learner {learner.name!r}: the gradient's structure {jax.tree.structure(grads)} does not "
                             f"match the meta-parameters' {treedef}")
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(mp)[0]]
        rng = np.random.default_rng(seed)
        per_leaf = {}
        for i, (leaf, g) in enumerate(zip(leaves, grad_leaves)):
            if not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.size == 0:
                continue
            directions = [rng.standard_normal(leaf.shape) for _ in range(num_directions)]
            if leaf.size <= max_coordinates:
                directions += [np.eye(leaf.size)[j].reshape(leaf.shape) for j in range(leaf.size)]
            worst = 0.0
            for v in directions:
                v = v / max(np.linalg.norm(v), 1e-300)

                def shifted(sign, v=v, i=i):
                    moved = list(leaves)
                    moved[i] = leaves[i] + sign * eps * jnp.asarray(v, jnp.float64)
                    return float(loss_fn(jax.tree.unflatten(treedef, moved)))

                fd = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
                an = float(jnp.vdot(jnp.asarray(g, jnp.float64), jnp.asarray(v)))
                worst = max(worst, abs(fd - an) / max(abs(fd), abs(an), 1e-12))
            per_leaf[paths[i]] = worst
    max_err = max(per_leaf.values(), default=0.0)
    if learner.exact_gradient:
        ok, note = bool(max_err <= rtol), (f"largest relative error {max_err:.3g} (threshold {rtol:g}) of the "
                                          "gradient against central finite differences of the learner's loss")
    else:
        ok, note = None, (f"learner {learner.name!r} does not claim the exact gradient of its loss (an estimator "
                          f"such as Reptile's, FOMAML's or iMAML's); largest relative difference {max_err:.3g}")
    return {"ok": ok, "max_rel_error": max_err, "per_leaf": per_leaf, "exact_gradient": learner.exact_gradient,
            "note": note}
