r"""Models as ``Model(init, apply)`` pairs of pure functions.

``linear`` is the seed's single neuron :math:`f_\theta(x) = \theta x` (Definition 1.2);
``mlp`` is the MAML paper's regression network (1-40-40-1 with ReLU for sinusoids).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmaml.core._checks import check_positive_int
from jmaml.core.types import Model, Params, PRNGKey

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


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """What an ``mlp``'s ``apply`` computes (its ``mlp_spec`` attribute): the widths, input first,
    and the activation. Backends that compute the network by hand (``jmaml.fused``) read it."""

    sizes: tuple[int, ...]
    activation: str


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

    Example:
      >>> import jax
      >>> net = mlp([1, 40, 40, 1])
      >>> [layer["w"].shape for layer in net.init(jax.random.key(0))]
      [(1, 40), (40, 40), (40, 1)]

    Returns:
      ``Model(init, apply)``; ``apply(params, x)`` maps ``(n, sizes[0])`` inputs to ``(n, sizes[-1])``.
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

    apply.mlp_spec = MLPSpec(tuple(sizes), activation)  # type: ignore[attr-defined]
    return Model(init, apply)


PRECISIONS = ("float32", "bf16")


def mixed_precision(model: Model, precision: str = "bf16") -> Model:
    """The model computing its forward pass in bfloat16, everything around it in float32.

    ``apply`` casts the parameters and the (floating-point) inputs to bfloat16, so every matmul and
    activation of the forward and backward passes runs in bfloat16, and casts the predictions back to
    the parameters' dtype, so losses are reduced in float32. The parameters the inner loop updates, their
    gradients (the cast's transpose returns float32), the meta-gradient summed over tasks and the
    optimiser state all stay float32: the usual master-weights scheme.

    Args:
      model: any ``Model`` (with or without state; a state's floating leaves are kept in their dtype).
      precision: ``"bf16"``, or ``"float32"`` (returns ``model`` unchanged).

    Returns:
      The wrapped ``Model`` (its ``apply`` carries ``precision``).

    Raises:
      ValueError: an unknown ``precision``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> net = mixed_precision(mlp([1, 8, 1]))
      >>> params = net.init(jax.random.key(0))
      >>> params[0]["w"].dtype, net.apply(params, jnp.ones((3, 1))).dtype
      (dtype('float32'), dtype('float32'))
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return model
    low = jnp.bfloat16

    def cast(tree: Any, dtype: Any) -> Any:
        return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

    def apply(params: Params, x: jax.Array, *state: Any) -> Any:
        out_dtype = jax.tree.leaves(params)[0].dtype
        out = model.apply(cast(params, low), cast(x, low), *state)
        if model.init_state is None:
            return cast(out, out_dtype)
        pred, new_state = out
        return cast(pred, out_dtype), jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state[0])

    apply.precision = precision  # type: ignore[attr-defined]
    return model._replace(apply=apply)


BATCH_NORM_EPS = 1e-5


# Batch norm's test-time modes, held in a model's state as ``bn_mode`` (an int32 scalar), so the mode is
# chosen at evaluation by the state passed in, without rebuilding the learner or its compiled program.
BN_MODES = ("transductive", "running")


def batch_norm_mode(state: Any, mode: str) -> Any:
    """A batch-norm model's state set to a test-time mode.

    Args:
      state: the state of a batch-norm model (``mlp_batchnorm``, ``conv4(running_stats=True)``, or an
        adapter's batch-norm module), e.g. ``TrainState.model_state`` after training.
      mode: ``"transductive"``: normalise with the statistics of the batch at hand (the support set
        while adapting, the query set when scoring; training's mode, and the MAML paper's evaluation),
        updating the running statistics; ``"running"``: normalise with the running statistics learned in
        training, not updated (inductive: no task's query set influences another's, or its own,
        predictions). A model built with ``per_step`` keeps statistics per inner step (MAML++'s BNRS)
        and uses step t's in either mode.

    Returns:
      The state with its mode set.

    Raises:
      ValueError: an unknown mode, or a state without a batch-norm mode (named).

    Example:
      >>> model = mlp_batchnorm([1, 8, 1])
      >>> int(batch_norm_mode(model.init_state(), "running")["bn_mode"])
      1
    """
    if mode not in BN_MODES:
        raise ValueError(f"mode must be one of {', '.join(BN_MODES)}, got {mode!r}")
    if not isinstance(state, dict) or "bn_mode" not in state:
        raise ValueError("batch_norm_mode: this state has no batch-norm mode (expected the state of a batch-norm "
                         f"model, a dict with 'bn_mode'; got {type(state).__name__})")
    return {**state, "bn_mode": jnp.asarray(BN_MODES.index(mode), jnp.int32)}


def batch_norm_label(state: Any) -> str:
    """What evaluation records of a model state: its batch-norm mode (``"running, per-step"`` ...), or
    ``"none"`` for a state that is not a batch-norm model's."""
    if not isinstance(state, dict) or "bn_mode" not in state:
        return "none"
    try:
        label = BN_MODES[int(np.asarray(state["bn_mode"]))]
    except (TypeError, IndexError, jax.errors.ConcretizationTypeError):
        return "traced"
    return label + (", per-step" if "bn_step" in state else "")


def _bn_state(widths: Sequence[int], per_step: int | None) -> dict[str, Any]:
    slots = () if per_step is None else (per_step + 1,)
    stats = [{"mean": jnp.zeros((*slots, w)), "var": jnp.ones((*slots, w))} for w in widths]
    state: dict[str, Any] = {"bn_mode": jnp.zeros((), jnp.int32), "stats": stats}
    if per_step is not None:
        state["bn_step"] = jnp.zeros((), jnp.int32)
    return state


def _bn(h: jax.Array, axes: tuple[int, ...], stats: dict[str, jax.Array], state: dict[str, Any],
        momentum: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Batch norm of ``h`` over ``axes`` by the state's mode; returns the normalised ``h`` (before scale
    and offset) and the statistics to keep. With per-step statistics (a leading slot axis), step
    ``bn_step`` reads and writes its own slot (the last one beyond)."""
    running = state["bn_mode"] == 1
    per_step = "bn_step" in state
    slot = jnp.minimum(state["bn_step"], stats["mean"].shape[0] - 1) if per_step else None
    r_mean = stats["mean"][slot] if per_step else stats["mean"]
    r_var = stats["var"][slot] if per_step else stats["var"]
    b_mean = jnp.mean(h, axis=axes)
    b_var = jnp.mean(jnp.square(h - jnp.expand_dims(b_mean, axes)), axis=axes)
    mean, var = jnp.where(running, r_mean, b_mean), jnp.where(running, r_var, b_var)
    out = (h - jnp.expand_dims(mean, axes)) * jnp.expand_dims(jax.lax.rsqrt(var + BATCH_NORM_EPS), axes)
    keep_mean = jnp.where(running, r_mean, momentum * r_mean + (1 - momentum) * jax.lax.stop_gradient(b_mean))
    keep_var = jnp.where(running, r_var, momentum * r_var + (1 - momentum) * jax.lax.stop_gradient(b_var))
    if per_step:
        keep_mean, keep_var = stats["mean"].at[slot].set(keep_mean), stats["var"].at[slot].set(keep_var)
    return out, {"mean": keep_mean, "var": keep_var}


def _bn_next(state: dict[str, Any], stats: list[dict[str, jax.Array]]) -> dict[str, Any]:
    """The state after a forward pass: new statistics and, with per-step statistics, the next step. In
    training (transductive) the step wraps after the query pass (k support steps + 1), so every
    meta-step's tasks start at step 0; in running mode it counts on, the last slot serving beyond k."""
    new = {**state, "stats": stats}
    if "bn_step" in state:
        slots = stats[0]["mean"].shape[0] if stats else 1
        t = state["bn_step"] + 1
        new["bn_step"] = jnp.where(state["bn_mode"] == 1, t, t % slots).astype(jnp.int32)
    return new


def _slot_weights(norm: dict[str, jax.Array], state: dict[str, Any], per_step_weights: bool
                  ) -> tuple[jax.Array, jax.Array]:
    """A batch norm's scale and offset: per-step ones (MAML++'s BNWB: a leading slot axis) at the state's
    step, or the shared ones."""
    if not per_step_weights:
        return norm["scale"], norm["offset"]
    slot = jnp.minimum(state["bn_step"], norm["scale"].shape[0] - 1)
    return norm["scale"][slot], norm["offset"][slot]


def _check_per_step(per_step: int | None, per_step_weights: bool) -> None:
    if per_step is not None:
        check_positive_int(per_step, "per_step")
    if per_step_weights and per_step is None:
        raise ValueError("per_step_weights (MAML++'s BNWB) keeps a scale and offset per inner step: it needs "
                         "per_step=k")


def mlp_batchnorm(sizes: Sequence[int], activation: str = "relu", *, momentum: float = 0.9,
                  per_step: int | None = None, per_step_weights: bool = False) -> Model:
    """``mlp`` with batch norm after every hidden layer, keeping running statistics as model state.

    Training normalises with the statistics of the batch at hand and updates the running mean and
    variance by ``momentum``. At test time the state's mode decides (``batch_norm_mode``):
    ``"transductive"`` as in training (the MAML paper's evaluation), or ``"running"`` (the learned
    statistics, not updated). ``apply(params, x, state) -> (predictions, new_state)``. The state is
    never a parameter: no meta-gradient reaches it.

    Args:
      sizes: layer widths, as ``mlp``.
      activation: as ``mlp``.
      momentum: the running statistics' decay, in [0, 1).
      per_step: k, to keep statistics per inner step (MAML++'s per-step batch-norm running statistics,
        BNRS): k + 1 slots, step t of the inner loop using slot t and the query pass after k steps slot
        k; steps beyond k at test time use the last. None: one set of statistics.
      per_step_weights: with ``per_step``, also a learnable scale and offset per step (MAML++'s
        per-step batch-norm weights, BNWB), each slot's trained by the steps that use it.

    Returns:
      ``Model(init, apply, init_state)``; params are the ``mlp``'s layers plus a ``scale`` and
      ``offset`` per hidden layer; the state is ``{"bn_mode", "stats": [{"mean", "var"}] per hidden
      layer}`` (and ``"bn_step"`` with ``per_step``).

    Raises:
      ValueError: ``momentum`` outside [0, 1), or ``per_step`` not an int >= 1 (named).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = mlp_batchnorm([1, 8, 1])
      >>> y, state = model.apply(model.init(jax.random.key(0)), jnp.ones((5, 1)), model.init_state())
      >>> y.shape, sorted(state)
      ((5, 1), ['bn_mode', 'stats'])
    """
    base = mlp(sizes, activation)
    act = ACTIVATIONS[activation]
    widths = list(sizes)[1:-1]
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    _check_per_step(per_step, per_step_weights)
    lead = (per_step + 1,) if per_step_weights and per_step is not None else ()

    def init(key: PRNGKey) -> dict[str, Any]:
        norm = [{"scale": jnp.ones((*lead, w)), "offset": jnp.zeros((*lead, w))} for w in widths]
        return {"layers": base.init(key), "norm": norm}

    def init_state() -> dict[str, Any]:
        return _bn_state(widths, per_step)

    def apply(params: Params, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        h, kept = x, []
        for layer, norm, stats in zip(params["layers"][:-1], params["norm"], state["stats"]):
            h, new = _bn(_dense(layer, h), (0,), stats, state, momentum)
            scale, offset = _slot_weights(norm, state, per_step_weights)
            h = act(h * scale[None, :] + offset[None, :])
            kept.append(new)
        return _dense(params["layers"][-1], h), _bn_next(state, kept)

    return Model(init, apply, init_state)


def _conv_block(block: dict[str, jax.Array], h: jax.Array, strided: bool) -> jax.Array:
    """3x3 conv (stride 2 if ``strided``) -> batch norm on this batch's statistics -> ReLU -> 2x2 max-pool
    (unless strided). ``h`` is NHWC."""
    h = _conv(h, block["w"], 2 if strided else 1)
    h = jax.nn.relu(_batch_norm(h, block["scale"], block["offset"]))
    if not strided:
        h = _max_pool(h)
    return h


def _conv(h: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
    return jax.lax.conv_general_dilated(h, w, window_strides=(stride, stride), padding="SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _batch_norm(h: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """Transductive batch norm of NHWC ``h``: the mean and variance of the batch at hand (a task's
    support set, or its query set), per channel; learnable scale and offset; no running averages."""
    mean = jnp.mean(h, axis=(0, 1, 2), keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=(0, 1, 2), keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS)
    return h * scale.reshape(1, 1, 1, -1) + offset.reshape(1, 1, 1, -1)


def _max_pool(h: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _he_conv(key: PRNGKey, size: int, cin: int, cout: int) -> jax.Array:
    """He-style scaled normal weights of a ``size`` x ``size`` convolution (for ReLU-like activations)."""
    return jax.random.normal(key, (size, size, cin, cout)) * jnp.sqrt(2.0 / (size * size * cin))


def _check_images(x: jax.Array, image_size: int, in_channels: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1:] != (image_size, image_size, in_channels):
        raise ValueError(f"{name} expects images of shape (n, {image_size}, {image_size}, {in_channels}), "
                         f"got {x.shape}")


def conv4(num_classes: int, *, in_channels: int = 1, filters: int = 64, strided: bool = True,
          image_size: int = 28, running_stats: bool = False, momentum: float = 0.9,
          per_step: int | None = None, per_step_weights: bool = False) -> Model:
    """The MAML paper's 4-block CNN for few-shot classification (Omniglot, miniImageNet).

    Each block: 3x3 convolution with ``filters`` channels, batch norm, ReLU, then 2x2 max-pooling —
    or, with ``strided`` (Omniglot, as the paper's code does), stride-2 convolutions and no pooling.
    Then a dense layer to ``num_classes`` logits: on the spatial mean of the last block's features
    when strided (the paper's Omniglot model), on the flattened features otherwise (miniImageNet:
    ``filters=32``, ``strided=False``, ``image_size=84``).

    Batch norm uses the statistics of the batch at hand — the support set when adapting, the query
    set when scoring — with learnable scale and offset and no running averages carried between
    tasks (transductive, as in the paper and most reproductions). A model evaluated on one example
    at a time would normalise it by itself; evaluate on whole query sets. With ``running_stats`` it
    also keeps running statistics as model state, and the state's mode chooses at test time between
    the batch's statistics and the running ones (``batch_norm_mode``; ``per_step``: MAML++'s per-step
    statistics, as ``mlp_batchnorm``).

    Args:
      num_classes: N, the ways.
      in_channels: 1 (grey) or 3 (RGB).
      filters: channels of every convolution (64 for Omniglot, 32 for miniImageNet).
      strided: stride-2 convolutions instead of max-pooling.
      image_size: input height = width, to size the dense layer.
      running_stats: keep batch norm's running statistics as model state (``apply(params, x, state)
        -> (logits, state)``; ``init_state()``), for a test-time mode chosen at evaluation.
      momentum, per_step, per_step_weights: the running statistics' decay, per-step slots and per-step
        scale and offset (with ``running_stats``; as ``mlp_batchnorm``).

    Returns:
      ``Model(init, apply)``; ``apply(params, x)`` takes images ``(n, image_size, image_size,
      in_channels)`` and returns logits ``(n, num_classes)`` (with ``running_stats``, ``Model(init,
      apply, init_state)`` and ``apply(params, x, state) -> (logits, state)``).

    Raises:
      ValueError: non-positive sizes, or an image too small for four downsamplings.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> net = conv4(5, in_channels=3, filters=8, strided=False, image_size=32)
      >>> net.apply(net.init(jax.random.key(0)), jnp.zeros((10, 32, 32, 3))).shape
      (10, 5)
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
        blocks = [{"w": _he_conv(keys[i], 3, in_channels if i == 0 else filters, filters),
                   "scale": jnp.ones((filters,)), "offset": jnp.zeros((filters,))} for i in range(4)]
        bound = 1.0 / jnp.sqrt(features)
        head = {"w": jax.random.uniform(keys[4], (features, num_classes), minval=-bound, maxval=bound),
                "b": jnp.zeros((num_classes,))}
        return {"blocks": blocks, "head": head}

    def head(params: Params, h: jax.Array) -> jax.Array:
        h = jnp.mean(h, axis=(1, 2)) if strided else h.reshape(h.shape[0], -1)
        return _dense(params["head"], h)

    def apply(params: Params, x: jax.Array) -> jax.Array:
        _check_images(x, image_size, in_channels, "conv4")
        h = x
        for block in params["blocks"]:
            h = _conv_block(block, h, strided)
        return head(params, h)

    if not running_stats:
        if per_step is not None or per_step_weights:
            raise ValueError("per_step keeps per-step running statistics: it needs running_stats=True")
        return Model(init, apply)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    _check_per_step(per_step, per_step_weights)
    lead = (per_step + 1,) if per_step_weights and per_step is not None else ()

    def init_stateful(key: PRNGKey) -> dict[str, Any]:
        params = init(key)
        for block in params["blocks"]:
            block["scale"] = jnp.broadcast_to(block["scale"], (*lead, filters))
            block["offset"] = jnp.broadcast_to(block["offset"], (*lead, filters))
        return params

    def apply_stateful(params: Params, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        _check_images(x, image_size, in_channels, "conv4")
        h, kept = x, []
        for block, stats in zip(params["blocks"], state["stats"]):
            h, new = _bn(_conv(h, block["w"], 2 if strided else 1), (0, 1, 2), stats, state, momentum)
            scale, offset = _slot_weights(block, state, per_step_weights)
            h = jax.nn.relu(h * scale.reshape(1, 1, 1, -1) + offset.reshape(1, 1, 1, -1))
            if not strided:
                h = _max_pool(h)
            kept.append(new)
        return head(params, h), _bn_next(state, kept)

    return Model(init_stateful, apply_stateful, lambda: _bn_state([filters] * 4, per_step))


RESNET12_WIDTHS = (64, 160, 320, 640)  # Oreshkin et al. (2018), Lee et al. (2019)


def resnet12(num_classes: int, *, in_channels: int = 3, widths: tuple[int, ...] = RESNET12_WIDTHS,
             image_size: int = 84, leak: float = 0.1) -> Model:
    """ResNet-12, the backbone of most recent few-shot results (TADAM, Oreshkin et al. 2018;
    MetaOptNet, Lee et al. 2019), written as pure functions for meta-learning.

    Four residual blocks of widths ``widths`` (64-160-320-640 by default); each is three 3x3
    convolutions, each followed by batch norm and a leaky ReLU (slope ``leak``; the last one after
    the shortcut is added), a 1x1 convolution + batch norm shortcut, then 2x2 max-pooling. Global
    average pooling and a dense layer to ``num_classes`` logits. Batch norm is transductive, as in
    ``conv4`` (the statistics of the batch at hand, learnable scale and offset, no running
    averages). DropBlock, which the supervised-pretraining papers add, is left out: inner-loop
    adaptation on a few images has little to regularise and the meta-gradient stays deterministic.

    Args:
      num_classes: N, the ways.
      in_channels: 1 (grey) or 3 (RGB).
      widths: channels of the four blocks (smaller widths make a cheaper model of the same shape).
      image_size: input height = width (at least 16: four 2x2 poolings).
      leak: the leaky ReLU's negative slope.

    Returns:
      ``Model(init, apply)``; ``apply(params, x)`` takes images ``(n, image_size, image_size,
      in_channels)`` and returns logits ``(n, num_classes)``.

    Raises:
      ValueError: non-positive sizes, not four widths, or an image too small for four poolings.

    Example:
      >>> import jax
      >>> net = resnet12(5, widths=(4, 4, 8, 8), image_size=16)
      >>> params = net.init(jax.random.key(0))
      >>> net.apply(params, jax.numpy.zeros((10, 16, 16, 3))).shape
      (10, 5)
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    in_channels = check_positive_int(in_channels, "in_channels")
    image_size = check_positive_int(image_size, "image_size")
    widths = tuple(widths)
    if len(widths) != 4:
        raise ValueError(f"widths must be four block widths, got {widths!r}")
    for i, w in enumerate(widths):
        check_positive_int(w, f"widths[{i}]")
    if image_size < 16:
        raise ValueError(f"image_size {image_size} is too small for ResNet-12's four 2x2 poolings (at least 16)")

    def init(key: PRNGKey) -> dict[str, Any]:
        keys = jax.random.split(key, 4 * 4 + 1)
        blocks, cin = [], in_channels
        for b, cout in enumerate(widths):
            k = keys[4 * b:4 * b + 4]
            norm = lambda w: {"w": w, "scale": jnp.ones((cout,)), "offset": jnp.zeros((cout,))}
            blocks.append({"convs": [norm(_he_conv(k[i], 3, cin if i == 0 else cout, cout)) for i in range(3)],
                           "shortcut": norm(_he_conv(k[3], 1, cin, cout))})
            cin = cout
        bound = 1.0 / jnp.sqrt(widths[-1])
        head = {"w": jax.random.uniform(keys[-1], (widths[-1], num_classes), minval=-bound, maxval=bound),
                "b": jnp.zeros((num_classes,))}
        return {"blocks": blocks, "head": head}

    def apply(params: Params, x: jax.Array) -> jax.Array:
        _check_images(x, image_size, in_channels, "resnet12")
        act = lambda h: jax.nn.leaky_relu(h, leak)
        h = x
        for block in params["blocks"]:
            out = h
            for i, conv in enumerate(block["convs"]):
                out = _batch_norm(_conv(out, conv["w"]), conv["scale"], conv["offset"])
                if i < 2:
                    out = act(out)
            sc = block["shortcut"]
            h = _max_pool(act(out + _batch_norm(_conv(h, sc["w"]), sc["scale"], sc["offset"])))
        return _dense(params["head"], jnp.mean(h, axis=(1, 2)))

    return Model(init, apply)
