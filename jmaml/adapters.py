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

from jmaml.types import Model


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


def flax_linen(module: Any, example_input: Any) -> Model:
    """A Flax linen module as a ``Model``: ``init(key)`` is ``module.init(key, example_input)["params"]``
    and ``apply(params, x)`` is ``module.apply({"params": params}, x)``.

    Raises:
      ValueError: if the module keeps variables besides ``params`` (e.g. ``batch_stats``).
    """
    _need("flax.linen", "flax")

    def init(key):
        variables = module.init(key, example_input)
        others = sorted(set(variables) - {"params"})
        if others:
            raise ValueError(f"flax_linen: the module keeps variables {others} besides params; only stateless "
                             "modules are adapted (use batch statistics, as the paper's Conv-4 does)")
        return variables["params"]

    def apply(params, x):
        return module.apply({"params": params}, x)

    return Model(init, apply)


def flax_nnx(module: Any = None, *, make: Callable[[Any], Any] | None = None) -> Model:
    """A Flax nnx module as a ``Model``: the parameters are its ``nnx.State`` of ``nnx.Param``
    variables; every other variable stays with the graph definition.

    Args:
      module: an ``nnx.Module`` (``init`` returns its parameters whatever the key), or
      make: a constructor ``make(rngs) -> module`` (``init(key)`` calls it with ``nnx.Rngs(key)``).
    """
    nnx = _need("flax.nnx", "flax")
    if (module is None) == (make is None):
        raise ValueError("flax_nnx() takes exactly one of module (an nnx.Module) and make (rngs -> nnx.Module)")
    reference = module if module is not None else make(nnx.Rngs(0))  # type: ignore[misc]
    if not isinstance(reference, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module, got {type(reference).__name__}")
    graphdef, _, rest = nnx.split(reference, nnx.Param, ...)

    def init(key):
        built = reference if make is None else make(nnx.Rngs(key))
        return nnx.split(built, nnx.Param, ...)[1]

    def apply(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    return Model(init, apply)
