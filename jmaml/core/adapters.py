"""Models from the JAX neural-network libraries as ``jmaml.Model(init, apply)``: Equinox modules,
Flax linen modules and Flax nnx modules. Optional: each needs its library (``pip install
'jmaml[equinox]'`` or ``'jmaml[flax]'``), imported only when its adapter is called.

The parameters a learner sees are the library's own pytree — an Equinox module with its arrays (and
``None`` where it holds anything else), a linen ``params`` dict, an nnx ``State`` of ``nnx.Param``
variables — so every tree operation in jmaml (rate trees, masks, checkpoints) walks them as they are.
Whatever is not a trainable array (activation functions, layer sizes, nnx's other variables) stays
in the closure, never in the parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jmaml.core.types import Model


def _need(name: str, extra: str):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        raise ImportError(f"this adapter needs {name}: pip install 'jmaml[{extra}]'") from None


def equinox(module: Any = None, *, make: Callable[[jax.Array], Any] | None = None, per_example: bool = True) -> Model:
    """An Equinox module as a ``Model``.

    Args:
      module: an ``eqx.Module`` instance: ``init`` returns its arrays whatever the key (the module is
        the initialisation).
      make: or a constructor ``make(key) -> module``: ``init(key)`` builds a fresh one.
      per_example: the module maps one example (Equinox's convention, e.g. ``eqx.nn.MLP``), so
        ``apply`` vmaps it over the batch's leading axis; False if it takes a batch itself.

    Returns:
      ``Model(init, apply)``; params are the module's inexact arrays (``eqx.filter``).

    Examples:
      >>> import jax, equinox as eqx
      >>> from jmaml import adapters
      >>> model = adapters.equinox(make=lambda key: eqx.nn.MLP(1, 1, 40, 2, key=key))
      >>> params = model.init(jax.random.key(0))
      >>> model.apply(params, jax.numpy.zeros((5, 1))).shape
      (5, 1)
    """
    eqx = _need("equinox", "equinox")
    if (module is None) == (make is None):
        raise ValueError("equinox() takes exactly one of module (an eqx.Module) and make (key -> eqx.Module)")
    reference = module if module is not None else eqx.filter_eval_shape(make, jax.random.key(0))
    if not isinstance(reference, eqx.Module):
        raise TypeError(f"module must be an equinox.Module, got {type(reference).__name__}")
    _, static = eqx.partition(reference, eqx.is_inexact_array)

    def init(key):
        built = module if make is None else make(key)
        return eqx.filter(built, eqx.is_inexact_array)

    def apply(params, x):
        net = eqx.combine(params, static)
        return jax.vmap(net)(x) if per_example else net(x)

    return Model(init, apply)


def _bn_model(init: Callable[..., Any], stats: Callable[[], Any],
              run: Callable[[Any, Any, Any, bool], tuple[Any, Any]]) -> Model:
    """A ``Model`` with batch-norm state from a library's forward pass ``run(params, stats, x, running) ->
    (predictions, new_stats)``: the state is ``{"bn_mode", "stats"}`` (``jmaml.models.batch_norm_mode``
    chooses the test-time mode), and ``apply`` runs the batch-statistics or the running-statistics pass
    by the state's mode."""
    import jax.numpy as jnp

    def init_state():
        return {"bn_mode": jnp.zeros((), jnp.int32), "stats": stats()}

    def apply(params, x, state):
        y, new = jax.lax.cond(state["bn_mode"] == 1, lambda: run(params, state["stats"], x, True),
                              lambda: run(params, state["stats"], x, False))
        return y, {**state, "stats": new}

    return Model(init, apply, init_state)


def flax_linen(module: Any, example_input: Any, *, train_arg: str = "train") -> Model:
    """A Flax linen module as a ``Model``: ``init(key)`` is ``module.init(key, example_input)["params"]``
    and ``apply(params, x)`` is ``module.apply({"params": params}, x)``.

    A module with batch norm (a ``batch_stats`` collection) becomes a ``Model`` with state: its
    running statistics are the state (``init_state()``; ``apply(params, x, state) -> (predictions,
    state)``; train with ``make_loss(..., stateful=True)`` and ``fit(..., model_state=...)``). The
    module's ``__call__`` must take the keyword ``train_arg`` (``train=True``: batch statistics,
    updated; ``False``: the running ones, as linen's ``BatchNorm(use_running_average=not train)``),
    and the state's mode picks it (``jmaml.models.batch_norm_mode``).

    Args:
      module: the linen module.
      example_input: an input batch to initialise it with.
      train_arg: the keyword of a batch-norm module's ``__call__`` that switches batch statistics on.

    Raises:
      ValueError: the module keeps variables besides ``params`` and ``batch_stats``, or has batch norm
        and its ``__call__`` does not take ``train_arg``.
    """
    _need("flax.linen", "flax")

    def variables_of(key, **kwargs):
        variables = module.init(key, example_input, **kwargs)
        others = sorted(set(variables) - {"params", "batch_stats"})
        if others:
            raise ValueError(f"flax_linen: the module keeps variables {others} besides params and batch_stats; "
                             "only those two are adapted")
        return variables

    try:
        shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), example_input))
    except TypeError:  # a batch-norm module needs its train flag to initialise
        shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), example_input, **{train_arg: False}))
    if "batch_stats" not in shapes:
        def init(key):
            return variables_of(key)["params"]

        def apply(params, x):
            return module.apply({"params": params}, x)

        return Model(init, apply)

    def with_flag(running: bool) -> dict[str, bool]:
        return {train_arg: not running}

    try:
        jax.eval_shape(lambda: module.init(jax.random.key(0), example_input, **with_flag(True)))
    except TypeError as e:
        raise ValueError(f"flax_linen: the module has batch norm (batch_stats) and its __call__ must take "
                         f"{train_arg}=True/False to switch batch statistics on and off ({e}); pass "
                         "train_arg= its name") from None

    def run(params, stats, x, running):
        variables = {"params": params, "batch_stats": stats}
        if running:
            return module.apply(variables, x, **with_flag(True)), stats
        y, updated = module.apply(variables, x, **with_flag(False), mutable=["batch_stats"])
        return y, updated["batch_stats"]

    return _bn_model(lambda key: variables_of(key, **with_flag(True))["params"],
                     lambda: variables_of(jax.random.key(0), **with_flag(True))["batch_stats"], run)


def flax_nnx(module: Any = None, *, make: Callable[[Any], Any] | None = None) -> Model:
    """A Flax nnx module as a ``Model``: the parameters are its ``nnx.State`` of ``nnx.Param``
    variables; every other variable stays with the graph definition.

    A module with batch norm (``nnx.BatchStat`` variables) becomes a ``Model`` with state: its
    running statistics are the state, threaded through every forward pass as arrays (each pass merges
    a fresh module, so nothing is mutated across JAX traces); ``apply(params, x, state) ->
    (predictions, state)``, and the state's mode (``jmaml.models.batch_norm_mode``) sets the
    modules' ``use_running_average``.

    Args:
      module: an ``nnx.Module`` (``init`` returns its parameters whatever the key), or
      make: a constructor ``make(rngs) -> module`` (``init(key)`` calls it with ``nnx.Rngs(key)``).
    """
    import inspect

    nnx = _need("flax.nnx", "flax")
    if (module is None) == (make is None):
        raise ValueError("flax_nnx() takes exactly one of module (an nnx.Module) and make (rngs -> nnx.Module)")
    reference = module if module is not None else make(nnx.Rngs(0))  # type: ignore[misc]
    if not isinstance(reference, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module, got {type(reference).__name__}")
    copy = {"copy": True} if "copy" in inspect.signature(nnx.merge).parameters else {}
    graphdef, _, stats0, rest = nnx.split(reference, nnx.Param, nnx.BatchStat, ...)

    def init(key):
        built = reference if make is None else make(nnx.Rngs(key))
        return nnx.split(built, nnx.Param, ...)[1]

    if not jax.tree.leaves(stats0):
        def apply(params, x):
            return nnx.merge(graphdef, params, stats0, rest, **copy)(x)

        return Model(init, apply)

    def run(params, stats, x, running):
        net = nnx.merge(graphdef, params, stats, rest, **copy)
        net.set_attributes(use_running_average=running, raise_if_not_found=False)
        y = net(x)
        return y, (stats if running else nnx.state(net, nnx.BatchStat))

    return _bn_model(init, lambda: stats0, run)
