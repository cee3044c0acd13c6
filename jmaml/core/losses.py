r"""Loss functions and ``make_loss``, which turns a model's ``apply`` into ``loss_fn(params, batch)``.

The seed uses the **sum** of squared errors (its Eq. 1),
:math:`\mathcal{L}(f_w) = \sum_i (y_i - w x_i)^2`; the MAML paper uses the mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jmaml.core.types import Batch, LossFn, Params


def _check_same_shape(pred: jax.Array, target: jax.Array, what: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{what}: predictions have shape {pred.shape} but targets have shape "
                         f"{target.shape}; they must match (reshape y to the model's output)")


def sum_squared_error(pred: jax.Array, target: jax.Array) -> jax.Array:
    r"""Sum of squared errors :math:`\sum_i (y_i - \hat y_i)^2` (the seed's Eq. 1)."""
    _check_same_shape(pred, target, "sum_squared_error")
    # Written out rather than optax.losses.squared_error ((pred - target) ** 2): the two round their
    # gradients differently, and over 1000 meta-steps that moved the committed sinusoid results.
    return jnp.sum(jnp.square(target - pred))


def mean_squared_error(pred: jax.Array, target: jax.Array) -> jax.Array:
    r"""Mean squared error over all elements (the MAML paper's regression loss)."""
    _check_same_shape(pred, target, "mean_squared_error")
    return jnp.mean(jnp.square(target - pred))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``logits`` (n, C) against integer ``labels`` (n,)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError("softmax_cross_entropy: expected logits of shape (n, num_classes) and "
                         f"integer labels of shape (n,), got {logits.shape} and {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"softmax_cross_entropy: labels must be integers, got dtype {labels.dtype}")
    return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels))


LOSS_KINDS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "sse": sum_squared_error,
    "mse": mean_squared_error,
    "xent": softmax_cross_entropy,
}


def make_loss(apply_fn: Callable[..., jax.Array], kind: str = "mse", *, stateful: bool = False) -> LossFn:
    """Builds ``loss_fn(params, batch) -> scalar`` from a model's apply function.

    Args:
      apply_fn: ``apply(params, x) -> predictions``.
      kind: ``"sse"`` (sum of squared errors, the seed's loss), ``"mse"`` (mean squared
        error, the paper's) or ``"xent"`` (softmax cross-entropy on integer labels).

      stateful: ``apply_fn(params, x, state) -> (predictions, new_state)`` (a model with state,
        ``Model.init_state``); the loss is then ``loss_fn(params, batch, state) -> (loss, new_state)``.

    Returns:
      A pure function ``loss_fn(params, batch)`` (with ``stateful``: ``loss_fn(params, batch, state)``).

    Raises:
      ValueError: for an unknown ``kind``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jmaml import Batch, make_loss, models
      >>> loss = make_loss(models.linear().apply, "sse")
      >>> float(loss(jnp.array(1.0), Batch(jnp.array([1., 2, 3]), jnp.array([2., 4, 1]))))
      9.0
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {apply_fn!r}")
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {sorted(LOSS_KINDS)}, got {kind!r}")
    point_loss = LOSS_KINDS[kind]

    if stateful:
        def stateful_loss(params: Params, batch: Batch, state: Any) -> tuple[jax.Array, Any]:
            predictions, new_state = apply_fn(params, batch.x, state)
            return point_loss(predictions, batch.y), new_state

        return stateful_loss

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        return point_loss(apply_fn(params, batch.x), batch.y)

    # what the loss is made of, for backends that compute it by hand (jmaml.fused)
    loss_fn.loss_spec = (kind, apply_fn)  # type: ignore[attr-defined]
    return loss_fn
