"""Meta-learners: one module per algorithm, and the registry that names them.

Every learner is a ``jmaml.MetaLearner`` built by a factory ``factory(loss_fn, *, inner_lr,
num_inner_steps, reduction="mean", unroll=1, remat=False, **own_options)``. The factory's own options
are declared once, in its module's ``OPTIONS``, and from there they are validated, recorded in run
dirs and turned into ``jmaml train`` flags. Adding an algorithm is a new module here and one line in
``REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import optax

from jmaml.core.protocols import MetaLearner
from jmaml.core.types import LossFn, Model
from jmaml.learners import anil as _anil
from jmaml.learners import cavia as _cavia
from jmaml.learners import imaml as _imaml
from jmaml.learners import maml as _maml
from jmaml.learners import mamlpp as _mamlpp
from jmaml.learners import metasgd as _metasgd
from jmaml.learners import reptile as _reptile
from jmaml.learners._common import Option, fixed_rates, gradient_adapt, rate_rule
from jmaml.learners.anil import anil
from jmaml.learners.cavia import CAVIAParams, cavia, with_context
from jmaml.learners.imaml import imaml
from jmaml.learners.maml import InnerHyperParams, fomaml, maml
from jmaml.learners.mamlpp import mamlpp
from jmaml.learners.metasgd import meta_sgd
from jmaml.learners.reptile import reptile

BASELINE = "pretrained"  # the name (and run phase) of the paper's "pretrained" regression baseline


def rate_optimiser(params_optimiser: optax.GradientTransformation,
                   rates_optimiser: optax.GradientTransformation) -> optax.GradientTransformation:
    """One optimiser for learned-rate meta-parameters (``MetaSGDParams``, ``MAMLPPParams``): the
    first transforms ``.params``, the second ``.inner_lr``.

    Adam moves every coordinate by about its learning rate per step whatever the gradient's scale,
    so at β = 1e-3 the rates (~1e-3 to 1e-2) change by a large fraction of themselves each step;
    a smaller rate for them (e.g. ``optax.adam(1e-5)``) keeps their inner loops stable.
    """
    def labels(meta_params):
        if not hasattr(meta_params, "inner_lr") or not hasattr(meta_params, "params"):
            raise TypeError("rate_optimiser needs meta-parameters with .params and .inner_lr (MetaSGDParams, "
                            f"MAMLPPParams); got {type(meta_params).__name__}")
        return meta_params._replace(params=jax.tree.map(lambda _: "params", meta_params.params),
                                    inner_lr=jax.tree.map(lambda _: "rates", meta_params.inner_lr))

    return optax.multi_transform({"params": params_optimiser, "rates": rates_optimiser}, labels)


def _learned_rate_optimiser(make: Callable[[float], optax.GradientTransformation], meta_lr: float,
                            rate_meta_lr: float | None = None) -> optax.GradientTransformation:
    if rate_meta_lr is None:
        return make(meta_lr)
    return rate_optimiser(make(meta_lr), make(rate_meta_lr))


class LearnerSpec(NamedTuple):
    """A registry entry: how to build a learner by name from a loss and options.

    Attributes:
      factory: ``factory(loss_fn, *, inner_lr, num_inner_steps, reduction, unroll, remat, **options)``.
      label: the name people use.
      options: the factory's own options (``Option``), with defaults and checks.
      min_inner_steps: the smallest k the algorithm accepts.
      meta_optimiser: ``meta_optimiser(make, meta_lr, **optimiser_options)`` builds the outer optimiser
        (``make(rate) -> GradientTransformation``); None: ``make(meta_lr)``.
      wrap_model: ``wrap_model(model, **options) -> model`` when the algorithm changes the model
        (CAVIA's context inputs); ``extra_inputs(**options)`` says by how many input features.
      traced_k: the factory takes ``max_inner_steps`` and then k per call (a sweep traces k).
      implied: settings the name implies (FOMAML: ``first_order``), as ``algorithm_settings`` records
        them and old run dirs stored them.
    """

    factory: Callable[..., MetaLearner]
    label: str
    options: tuple[Option, ...] = ()
    min_inner_steps: int = 0
    meta_optimiser: Callable[..., optax.GradientTransformation] | None = None
    wrap_model: Callable[..., Model] | None = None
    extra_inputs: Callable[..., int] | None = None
    traced_k: bool = False
    implied: Mapping[str, Any] = MappingProxyType({})


REGISTRY: dict[str, LearnerSpec] = {
    "maml": LearnerSpec(maml, "MAML", _maml.OPTIONS, traced_k=True),
    "fomaml": LearnerSpec(fomaml, "FOMAML", _maml.INNER_OPTIONS, traced_k=True,
                          implied=MappingProxyType({"first_order": True})),
    "reptile": LearnerSpec(reptile, "Reptile", _reptile.OPTIONS, min_inner_steps=1),
    "metasgd": LearnerSpec(meta_sgd, "Meta-SGD", _metasgd.OPTIONS, meta_optimiser=_learned_rate_optimiser),
    "anil": LearnerSpec(anil, "ANIL", _anil.OPTIONS),
    "mamlpp": LearnerSpec(mamlpp, "MAML++", _mamlpp.OPTIONS, min_inner_steps=1,
                          meta_optimiser=_learned_rate_optimiser),
    "imaml": LearnerSpec(imaml, "iMAML", _imaml.OPTIONS, min_inner_steps=1),
    "cavia": LearnerSpec(cavia, "CAVIA", _cavia.OPTIONS, wrap_model=lambda model, num_context: with_context(
        model, num_context), extra_inputs=lambda num_context: num_context),
}


def names() -> tuple[str, ...]:
    """The registered learners' names."""
    return tuple(REGISTRY)


def spec(name: str) -> LearnerSpec:
    """The registry entry of ``name``; ValueError naming the choices for an unknown name."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"algo must be one of {', '.join(REGISTRY)}; got {name!r}")
    return REGISTRY[name]


def specialised(name: str, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registered learner that ``name`` with ``options`` is, and the options left: an entry whose
    implied settings ``options`` gives, which are ``name``'s own options, and whose own options ``name``
    takes too (MAML with ``first_order=True`` is FOMAML, a learner of its own in a sweep, k traced)."""
    base = {o.name for o in spec(name).options}
    for other, s in REGISTRY.items():
        if (other != name and s.implied and set(s.implied) <= base and {o.name for o in s.options} <= base
                and all(k in options and options[k] == v for k, v in s.implied.items())):
            return other, {k: v for k, v in options.items() if k not in s.implied}
    return name, dict(options)


def owners(option: str) -> tuple[str, ...]:
    """The learners that own an option of this name."""
    return tuple(n for n, s in REGISTRY.items() if any(o.name == option for o in s.options))


def all_options() -> dict[str, Option]:
    """Every option of every registered learner, by name (options shared by learners appear once)."""
    out: dict[str, Option] = {}
    for s in REGISTRY.values():
        for o in s.options:
            out.setdefault(o.name, o)
    return out


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Checks options given for learner ``name``: each must be one of its own, with a valid value.

    Returns:
      The options with every default filled in (``None`` defaults that depend on the run stay None).

    Raises:
      ValueError: an unknown learner, an option of another learner (naming who owns it), or an
        option not known at all; the option's own check for a bad value.
    """
    entry = spec(name)
    own = {o.name: o for o in entry.options}
    for key, value in options.items():
        if key not in own:
            who = owners(key)
            if who:
                which = f"algo {who[0]!r}" if len(who) == 1 else "algos " + ", ".join(map(repr, who))
                raise ValueError(f"{key} = {value!r} applies to {which} only; this run's algo is {name!r}")
            known = sorted(all_options())
            raise ValueError(f"unknown algorithm option {key!r}; the options are {known}")
    resolved = {}
    for o in entry.options:
        value = options.get(o.name, o.default)
        if o.check is not None and value is not None:
            o.check(value, o.name)
        elif value is not None and o.type is bool and not isinstance(value, bool):
            raise TypeError(f"{o.name} must be true or false, got {value!r}")
        resolved[o.name] = value
    return resolved


def resolve_options(name: str, options: Mapping[str, Any], run_steps: int) -> dict[str, Any]:
    """``check_options``, then the run-dependent defaults filled from the run's length."""
    resolved = check_options(name, options)
    for o in spec(name).options:
        if resolved[o.name] is None and o.run_default is not None:
            resolved[o.name] = o.run_default(run_steps)
    return resolved


def _factory_kwargs(entry: LearnerSpec, opts: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved options as the factory's keyword arguments (those of the meta-optimiser left out)."""
    return {o.kwarg: opts[o.name] for o in entry.options if not o.meta_optimiser}


def make(name: str, loss_fn: LossFn, *, inner_lr: Any, num_inner_steps: int, options: Mapping[str, Any] | None = None,
         run_steps: int | None = None, **core: Any) -> MetaLearner:
    """Builds a registered learner from its name, a loss and its options.

    Args:
      name: a ``REGISTRY`` name.
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_lr, num_inner_steps: α and k.
      options: the learner's own options by their registry names (e.g. ``{"imaml_lambda": 2.0}``).
      run_steps: the run's meta-steps, for options whose default depends on it.
      **core: ``reduction``, ``unroll``, ``remat``.

    Raises:
      ValueError: see ``check_options``; k below the algorithm's minimum.

    Returns:
      The ``MetaLearner``.

    Example:
      >>> from jmaml import learners, make_loss, models
      >>> loss = make_loss(models.mlp([1, 8, 1]).apply, "mse")
      >>> learners.make("imaml", loss, inner_lr=0.01, num_inner_steps=5, options={"imaml_lambda": 2.0}).label
      'iMAML'
    """
    entry = spec(name)
    opts = resolve_options(name, options or {}, run_steps or 1)
    if num_inner_steps < entry.min_inner_steps:
        raise ValueError(f"algo {name!r} needs num_inner_steps >= {entry.min_inner_steps}, got {num_inner_steps}")
    return entry.factory(loss_fn, inner_lr=inner_lr, num_inner_steps=num_inner_steps, **core,
                         **_factory_kwargs(entry, opts))


def meta_optimiser(name: str, make_optimiser: Callable[[float], optax.GradientTransformation], meta_lr: float,
                   options: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
    """The outer optimiser a learner trains with: ``make_optimiser(meta_lr)``, or the learner's own
    combination (learned inner rates with their own meta rate)."""
    entry = spec(name)
    opts = check_options(name, options or {})
    if entry.meta_optimiser is None:
        return make_optimiser(meta_lr)
    own = {o.name: opts[o.name] for o in entry.options if o.meta_optimiser}
    return entry.meta_optimiser(make_optimiser, meta_lr, **own)


def wrap_model(name: str, model: Model, options: Mapping[str, Any] | None = None) -> Model:
    """The model as the learner needs it (unchanged but for learners like CAVIA)."""
    entry = spec(name)
    if entry.wrap_model is None:
        return model
    opts = check_options(name, options or {})
    return entry.wrap_model(model, **_factory_kwargs(entry, opts))


def extra_inputs(name: str, options: Mapping[str, Any] | None = None) -> int:
    """How many input features the learner adds to the model's inputs (0 for most)."""
    entry = spec(name)
    if entry.extra_inputs is None:
        return 0
    opts = check_options(name, options or {})
    return entry.extra_inputs(**_factory_kwargs(entry, opts))


__all__ = [
    "REGISTRY", "CAVIAParams", "InnerHyperParams",
    "LearnerSpec", "MetaLearner", "Option", "anil", "cavia", "check_options", "extra_inputs",
    "fixed_rates", "fomaml", "gradient_adapt", "imaml", "make", "maml", "mamlpp", "meta_optimiser", "meta_sgd",
    "names", "owners", "rate_optimiser", "rate_rule", "reptile", "resolve_options", "spec", "with_context",
    "wrap_model",
]
