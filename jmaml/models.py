r"""Models as ``Model(init, apply)`` pairs of pure functions.

``linear`` is the seed's single neuron :math:`f_\theta(x) = \theta x` (Definition 1.2);
``mlp`` is the MAML paper's regression network (1-40-40-1 with ReLU for sinusoids).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


BATCH_NORM_EPS = 1e-5


def mlp_batchnorm(sizes: Sequence[int], activation: str = "relu", *, momentum: float = 0.9) -> Model:
    """``mlp`` with batch norm after every hidden layer, keeping running statistics as model state.

    The forward pass normalises with the statistics of the batch at hand (as in training, and as
    the paper's transductive Conv-4 does) and returns the running mean and variance updated by
    ``momentum``: ``apply(params, x, state) -> (predictions, new_state)``. The running statistics
    are the model's state (``Model.init_state``), never parameters: no meta-gradient reaches them.

    Returns:
      ``Model(init, apply, init_state)``; params are the ``mlp``'s layers plus a ``scale`` and
      ``offset`` per hidden layer; the state is a list of ``{"mean", "var"}`` per hidden layer.
    """
    base = mlp(sizes, activation)
    act = ACTIVATIONS[activation]
    widths = list(sizes)[1:-1]
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")

    def init(key: PRNGKey) -> dict[str, Any]:
        norm = [{"scale": jnp.ones((w,)), "offset": jnp.zeros((w,))} for w in widths]
        return {"layers": base.init(key), "norm": norm}

    def init_state() -> list[dict[str, jax.Array]]:
        return [{"mean": jnp.zeros((w,)), "var": jnp.ones((w,))} for w in widths]

    def apply(params: Params, x: jax.Array, state: Any):
        h, new_state = x, []
        for layer, norm, stats in zip(params["layers"][:-1], params["norm"], state):
            h = _dense(layer, h)
            mean = jnp.mean(h, axis=0)
            var = jnp.mean(jnp.square(h - mean[None, :]), axis=0)
            h = (h - mean[None, :]) * jax.lax.rsqrt(var + BATCH_NORM_EPS)[None, :]
            h = act(h * norm["scale"][None, :] + norm["offset"][None, :])
            new_state.append({"mean": momentum * stats["mean"] + (1 - momentum) * jax.lax.stop_gradient(mean),
                              "var": momentum * stats["var"] + (1 - momentum) * jax.lax.stop_gradient(var)})
        return _dense(params["layers"][-1], h), new_state

    return Model(init, apply, init_state)


def _conv_block(block: dict[str, jax.Array], h: jax.Array, strided: bool) -> jax.Array:
    """3x3 conv (stride 2 if ``strided``) -> batch norm on this batch's statistics -> ReLU -> 2x2 max-pool
    (unless strided). ``h`` is NHWC."""
    h = jax.lax.conv_general_dilated(h, block["w"], window_strides=(2, 2) if strided else (1, 1), padding="SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # Transductive batch norm: the mean and variance of the batch at hand (a task's support set, or
    # its query set), per channel; learnable scale and offset; no running averages between tasks.
    mean = jnp.mean(h, axis=(0, 1, 2), keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=(0, 1, 2), keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS)
    h = h * block["scale"].reshape(1, 1, 1, -1) + block["offset"].reshape(1, 1, 1, -1)
    h = jax.nn.relu(h)
    if not strided:
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return h


def conv4(num_classes: int, *, in_channels: int = 1, filters: int = 64, strided: bool = True,
          image_size: int = 28) -> Model:
    """The MAML paper's 4-block CNN for few-shot classification (Omniglot, miniImageNet).

    Each block: 3x3 convolution with ``filters`` channels, batch norm, ReLU, then 2x2 max-pooling —
    or, with ``strided`` (Omniglot, as the paper's code does), stride-2 convolutions and no pooling.
    Then a dense layer to ``num_classes`` logits: on the spatial mean of the last block's features
    when strided (the paper's Omniglot model), on the flattened features otherwise (miniImageNet:
    ``filters=32``, ``strided=False``, ``image_size=84``).

    Batch norm uses the statistics of the batch at hand — the support set when adapting, the query
    set when scoring — with learnable scale and offset and no running averages carried between
    tasks (transductive, as in the paper and most reproductions). A model evaluated on one example
    at a time would normalise it by itself; evaluate on whole query sets.

    Args:
      num_classes: N, the ways.
      in_channels: 1 (grey) or 3 (RGB).
      filters: channels of every convolution (64 for Omniglot, 32 for miniImageNet).
      strided: stride-2 convolutions instead of max-pooling.
      image_size: input height = width, to size the dense layer.

    Returns:
      ``Model(init, apply)``; ``apply(params, x)`` takes images ``(n, image_size, image_size,
      in_channels)`` and returns logits ``(n, num_classes)``.
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    in_channels = check_positive_int(in_channels, "in_channels")
    filters = check_positive_int(filters, "filters")
    image_size = check_positive_int(image_size, "image_size")
    side = image_size
    for _ in range(4):
        side = -(-side // 2) if strided else side // 2
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for four 2x2 downsamplings")
    features = filters if strided else filters * side * side

    def init(key: PRNGKey) -> dict[str, Any]:
        keys = jax.random.split(key, 5)
        blocks = []
        for i in range(4):
            fan_in = 9 * (in_channels if i == 0 else filters)
            # He-style scaled normal for the ReLU convolutions
            w = jax.random.normal(keys[i], (3, 3, in_channels if i == 0 else filters, filters)) * jnp.sqrt(2.0 / fan_in)
            blocks.append({"w": w, "scale": jnp.ones((filters,)), "offset": jnp.zeros((filters,))})
        bound = 1.0 / jnp.sqrt(features)
        head = {"w": jax.random.uniform(keys[4], (features, num_classes), minval=-bound, maxval=bound),
                "b": jnp.zeros((num_classes,))}
        return {"blocks": blocks, "head": head}

    def apply(params: Params, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[1:] != (image_size, image_size, in_channels):
            raise ValueError(f"conv4 expects images of shape (n, {image_size}, {image_size}, {in_channels}), "
                             f"got {x.shape}")
        h = x
        for block in params["blocks"]:
            h = _conv_block(block, h, strided)
        h = jnp.mean(h, axis=(1, 2)) if strided else h.reshape(h.shape[0], -1)
        return _dense(params["head"], h)

    return Model(init, apply)
