r"""Models as ``Model(init, apply)`` pairs of pure functions.

``linear`` is the seed's single neuron :math:`f_\theta(x) = \theta x` (Definition 1.2);
``mlp`` is the MAML paper's regression network (1-40-40-1 with ReLU for sinusoids).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jmaml._checks import check_positive_int
from jmaml.types import Model, Params, PRNGKey

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "identity": lambda h: h,
}


def _dense(layer: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    out = h @ layer["w"]
    # Explicit broadcast of the bias: works under jax_numpy_rank_promotion="raise".
    return out + layer["b"].reshape((1,) * (out.ndim - 1) + layer["b"].shape)


def linear(*, init_scale: float = 1.0) -> Model:
    r"""The seed's single neuron :math:`f_\theta(x) = \theta x` (no bias).

    ``params`` is a scalar array :math:`\theta`; ``apply`` works on inputs of any shape.

    Args:
      init_scale: standard deviation of the normal draw that ``init`` returns.
    """

    def init(key: PRNGKey) -> jax.Array:
        return init_scale * jax.random.normal(key, ())

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return params * x

    return Model(init, apply)


def mlp(sizes: Sequence[int], activation: str = "relu") -> Model:
    """A fully connected network, e.g. ``mlp([1, 40, 40, 1])`` (the paper's sinusoid model).

    ``params`` is a list of ``{"w": (fan_in, fan_out), "b": (fan_out,)}`` dicts, initialised
    like PyTorch's ``nn.Linear`` (uniform in ``±1/sqrt(fan_in)``), the initialisation most MAML
    reproductions use. The activation is applied between layers, not after the last one.

    Args:
      sizes: layer widths, input first; at least two entries, each >= 1.
      activation: one of ``relu``, ``tanh``, ``sigmoid``, ``gelu``, ``silu``, ``identity``.

    Raises:
      ValueError: for fewer than two sizes, a size < 1 or an unknown activation.
    """
    sizes = list(sizes) if not isinstance(sizes, (str, bytes)) else sizes
    if not isinstance(sizes, list) or len(sizes) < 2:
        raise ValueError(f"sizes must list at least an input and an output width, got {sizes!r}")
    sizes = [check_positive_int(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    act = ACTIVATIONS[activation]

    def init(key: PRNGKey) -> list[dict[str, jax.Array]]:
        params = []
        for key_layer, (fan_in, fan_out) in zip(jax.random.split(key, len(sizes) - 1),
                                                zip(sizes[:-1], sizes[1:])):
            key_w, key_b = jax.random.split(key_layer)
            bound = 1.0 / jnp.sqrt(fan_in)
            params.append({
                "w": jax.random.uniform(key_w, (fan_in, fan_out), minval=-bound, maxval=bound),
                "b": jax.random.uniform(key_b, (fan_out,), minval=-bound, maxval=bound),
            })
        return params

    def apply(params: Params, x: jax.Array) -> jax.Array:
        h = x
        for layer in params[:-1]:
            h = act(_dense(layer, h))
        return _dense(params[-1], h)

    return Model(init, apply)
