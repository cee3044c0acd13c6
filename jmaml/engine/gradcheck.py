r"""``check_meta_gradient``: is a learner's meta-gradient the gradient of its own meta-loss?

A researcher who writes a learner wants to know its ``estimate`` is right before training with it.
This compares the gradient ``estimate`` returns with central finite differences of the loss it
returns, in float64, along random directions (and, for small meta-parameters, every coordinate),
and reports the errors per leaf. The finite differences share no code path with the gradient:
they only call ``estimate`` for its loss.

A directional derivative passes when it is within a mixed tolerance,
``|fd − ⟨g, v⟩| ≤ rtol·max(|fd|, |⟨g, v⟩|) + atol·‖g‖``: relative where the derivative is large,
and absolute — scaled to the whole gradient's norm — where it is near zero. A purely relative test
fails right gradients: a coordinate whose true derivative is −7e-12 (a ReLU unit that barely
fires) has finite differences of 0 and a "relative error" of 1, although it is correct to 12
digits of the gradient's scale.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmaml.core._checks import check_task_batch_tree
from jmaml.core._util import enable_x64
from jmaml.core.protocols import MetaLearner
from jmaml.engine.loop import check_learner


def _to64(tree: Any) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                        else jnp.asarray(a), tree)


RETRY_SHRINK = (10.0, 100.0)  # a failing direction is measured again at eps/10 and eps/100


def _kink(first: tuple[float, float], last: tuple[float, float], bound: float) -> bool:
    """Whether a direction meets a kink of the loss at the point itself (a ReLU unit exactly at 0): the
    gap between the forward and backward differences does not shrink with the step (at a smooth point
    it shrinks in proportion, 100-fold from ε to ε/100). There the loss has no derivative along the
    direction to compare with; the gradient a library returns is one subgradient by convention."""
    gap_first, gap_last = abs(first[0] - first[1]), abs(last[0] - last[1])
    if not (np.isfinite(gap_first) and np.isfinite(gap_last)) or gap_last <= bound:
        return False
    return gap_last > 0.5 * gap_first


def _leaf_eps(leaf: np.ndarray, eps: float | None) -> float:
    """The finite-difference step for a leaf: ``eps`` if given, else the float64 optimum for central
    differences, ε_mach^(1/3) ≈ 6e-6, times the leaf's scale (its RMS, at least 1)."""
    if eps is not None:
        return float(eps)
    scale = float(np.sqrt(np.mean(np.square(leaf)))) if leaf.size else 1.0
    return float(np.finfo(np.float64).eps ** (1 / 3) * max(1.0, scale))


def check_meta_gradient(learner: MetaLearner, meta_params: Any, tasks: Any, *, meta_step: Any = None,
                        eps: float | None = None, num_directions: int = 4, max_coordinates: int = 64, seed: int = 0,
                        rtol: float = 1e-5, atol: float = 1e-7) -> dict[str, Any]:
    r"""Compares ``learner.estimate``'s gradient with float64 central finite differences of its loss.

    For every leaf: the directional derivative along random unit directions (and along each
    coordinate for leaves of at most ``max_coordinates`` entries), :math:`fd = (L(θ + εv) − L(θ − εv))/2ε`,
    against :math:`a = \langle g, v\rangle`. A direction passes when
    :math:`|fd − a| \le rtol\cdot\max(|fd|, |a|) + atol\cdot\lVert g\rVert` (``‖g‖``: the norm of the whole
    gradient, every leaf). The check always runs in float64, whatever the caller's ``jax_enable_x64``.
    A direction that fails is measured again at ε/10 and ε/100 and judged by its best: a ReLU kink
    closer to the point than ε makes the central difference straddle it (a smaller step does not),
    while a wrong gradient fails at every step (``retried`` counts these per leaf). At a kink exactly at
    the point (a ReLU unit at 0, as zero-initialised biases make) the loss is not differentiable
    along some directions — the forward and backward differences disagree at every step — and there
    is no derivative to compare with: such a direction is counted in ``kinks`` and not judged (the
    note says how many). A wrong gradient still fails along every smooth direction.

    Args:
      learner: the learner to check (``learner.estimate(meta_params, tasks, meta_step)``).
      meta_params: where to check (e.g. ``learner.init(params)``); cast to float64.
      tasks: a task batch with a leading task axis on every leaf (one task: ``jax.tree.map(lambda a:
        a[None], task)``); floating leaves cast to float64.
      eps: the finite-difference step for every leaf; None (default): per leaf, ε_mach^(1/3) times the
        leaf's RMS (at least 1).
      num_directions: random directions per leaf.
      max_coordinates: leaves up to this size are also checked coordinate by coordinate.
      seed: the directions' seed.
      rtol: the relative part of the tolerance.
      atol: the absolute part, as a fraction of the gradient's norm.

    Returns:
      ``{"ok": bool, "num_tasks": int (the leading task axis taken), "max_rel_error": float,
      "max_abs_error": float, "worst": float, "grad_norm": float,
      "per_leaf": {path: {"ok", "rel_error", "abs_error", "worst", "eps", "directions", "retried",
      "kinks"}}, "exact_gradient":
      learner.exact_gradient, "note": str}``: ``rel_error`` is the largest
      :math:`|fd − a| / \max(|fd|, |a|)`, ``abs_error`` the largest :math:`|fd − a| / \lVert g\rVert`, and
      ``worst`` the largest error over its tolerance (a leaf passes when it is at most 1). For a learner
      that does not claim an exact gradient (Reptile, FOMAML, iMAML ...) the errors are reported but ``ok``
      is None, and the note says so.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jmaml import check_meta_gradient, learners, make_loss, models, tasks
      >>> loss = make_loss(models.linear().apply, "sse")
      >>> report = check_meta_gradient(learners.maml(loss, inner_lr=0.1, num_inner_steps=2),
      ...                              jnp.array(1.0), tasks.seed.meta_tasks())
      >>> report["ok"]
      True

    Raises:
      ValueError: the learner's gradient does not have the structure of its meta-parameters, or a
        tolerance or step is not a positive number (named).
    """
    check_learner(learner)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == np.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < np.inf):
        raise ValueError(f"eps must be a positive finite step or None (chosen per leaf), got {eps!r}")
    # every leaf must share the task axis (one task without it fails here, by name, when its support and query
    # sizes differ); the report says how many tasks it took, so one task read as its points shows in the note
    num_tasks = check_task_batch_tree(tasks, "tasks")
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
        grad_np = [np.asarray(g, np.float64) for g in grad_leaves]
        centre = float(loss_fn(mp))
        grad_norm = float(np.sqrt(sum(np.sum(np.square(g)) for g, leaf in zip(grad_np, leaves)
                                      if jnp.issubdtype(leaf.dtype, jnp.floating))))
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(mp)[0]]
        rng = np.random.default_rng(seed)
        per_leaf: dict[str, dict[str, Any]] = {}
        for i, (leaf, g) in enumerate(zip(leaves, grad_np)):
            if not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.size == 0:
                continue
            step = _leaf_eps(np.asarray(leaf), eps)
            directions = [rng.standard_normal(leaf.shape) for _ in range(num_directions)]
            if leaf.size <= max_coordinates:
                directions += [np.eye(leaf.size)[j].reshape(leaf.shape) for j in range(leaf.size)]
            rel = absolute = worst = 0.0
            retried = kinks = 0
            for v in directions:
                v = v / max(np.linalg.norm(v), 1e-300)
                an = float(np.vdot(g, v))

                def measure(h, v=v, i=i, an=an):
                    def shifted(sign):
                        moved = list(leaves)
                        moved[i] = leaves[i] + sign * h * jnp.asarray(v, jnp.float64)
                        return float(loss_fn(jax.tree.unflatten(treedef, moved)))

                    up, down = shifted(1.0), shifted(-1.0)
                    fd = (up - down) / (2 * h)
                    err = abs(fd - an)
                    bound = rtol * max(abs(fd), abs(an)) + atol * grad_norm
                    ratio = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
                    sides = ((up - centre) / h, (centre - down) / h)  # forward and backward differences
                    return fd, err, (ratio if np.isfinite(err) else float("inf")), sides, bound

                fd, err, ratio, sides, bound = measure(step)
                first_sides = sides
                for shrink in RETRY_SHRINK:  # a kink (ReLU) within the step of the point: the central
                    if ratio <= 1.0:  # difference straddles it; a smaller step does not, a wrong gradient
                        break  # fails at every step
                    retried += 1
                    candidate = measure(step / shrink)
                    if candidate[2] < ratio:
                        fd, err, ratio, _, bound = candidate
                    sides = candidate[3]
                if ratio > 1.0 and _kink(first_sides, sides, bound):
                    kinks += 1  # not differentiable along v: nothing to compare, so not judged (counted)
                    continue
                if not np.isfinite(err):
                    rel = absolute = worst = float("inf")
                    break
                rel = max(rel, err / max(abs(fd), abs(an), 1e-300) if err else 0.0)
                absolute = max(absolute, err / grad_norm if grad_norm > 0 else (0.0 if err == 0 else float("inf")))
                worst = max(worst, ratio)
            per_leaf[paths[i]] = {"ok": bool(worst <= 1.0), "rel_error": rel, "abs_error": absolute, "worst": worst,
                                  "eps": step, "directions": len(directions), "retried": retried, "kinks": kinks}
    max_rel = max((r["rel_error"] for r in per_leaf.values()), default=0.0)
    max_abs = max((r["abs_error"] for r in per_leaf.values()), default=0.0)
    worst = max((r["worst"] for r in per_leaf.values()), default=0.0)
    failing = [path for path, r in per_leaf.items() if not r["ok"]]
    kinks = sum(r["kinks"] for r in per_leaf.values())
    summary = (f"on {num_tasks} task(s): largest error {worst:.3g} of its tolerance (rtol {rtol:g} of the "
               f"derivative + atol {atol:g} of "
               f"|g| = {grad_norm:.3g}); largest relative error {max_rel:.3g}, largest absolute {max_abs:.3g} |g|"
               + (f"; {kinks} direction(s) at a kink of the loss (not differentiable there) not judged"
                  if kinks else ""))
    if learner.exact_gradient:
        ok = not failing
        note = summary + (f"; failing leaves: {', '.join(failing)}" if failing else "")
    else:
        ok, note = None, (f"learner {learner.name!r} does not claim the exact gradient of its loss (an estimator "
                          f"such as Reptile's, FOMAML's or iMAML's); {summary}")
    return {"ok": ok, "num_tasks": num_tasks, "max_rel_error": max_rel, "max_abs_error": max_abs, "worst": worst,
            "grad_norm": grad_norm,
            "per_leaf": per_leaf, "exact_gradient": learner.exact_gradient, "note": note}
