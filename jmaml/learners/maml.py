"""MAML and FOMAML: Finn, Abbeel & Levine (2017), Model-Agnostic Meta-Learning for Fast Adaptation
of Deep Networks, ICML.

The meta-gradient is ``jax.grad`` through the inner ``lax.scan`` (exact second order), or the
query gradient at the adapted parameters (first order, FOMAML). At test time: k SGD steps at α.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jmaml.core import estimators, fused, inner_optimisers
from jmaml.core.inner import adapt as adapt_inner
from jmaml.core.meta import batched_objective, pre_adapt_loss
from jmaml.core.protocols import MetaLearner
from jmaml.core.types import LossFn, Params
from jmaml.learners._common import Option, fixed_rates, gradient_adapt, rate_rule


def _check_optimiser_name(value, name):
    if value not in inner_optimisers.REGISTRY:
        raise ValueError(f"{name} must be one of {', '.join(inner_optimisers.REGISTRY)}; got {value!r}")
    return value


def _settings(text: str | None, name: str = "inner_settings") -> dict[str, float]:
    """``"momentum=0.9,b2=0.99"`` -> {"momentum": 0.9, "b2": 0.99}."""
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"{name} must be comma-separated name=number pairs like momentum=0.9; got {text!r}")
    return out


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


# Shared with FOMAML (the registry gives both these options).
INNER_OPTIONS = (
    Option("inner_optimiser", None, "the inner loop's update rule: sgd, momentum, nesterov, adam, rmsprop "
           "(jmaml.inner_optimisers; default: plain SGD at the inner rate)", type=str, check=_check_optimiser_name),
    Option("inner_settings", None, "the inner optimiser's settings, e.g. momentum=0.9 or b1=0.9,b2=0.99",
           type=str, check=lambda v, n: _settings(v, n)),
    Option("learn_inner_hyper", None, "inner-optimiser hyperparameters to meta-learn, e.g. learning_rate,momentum "
           "(one value each; --per-parameter-hyper: one per parameter)", type=str),
    Option("per_parameter_hyper", False, "meta-learn one value of each learned hyperparameter per parameter "
           "(Meta-SGD's rates are learning_rate learned this way)", type=bool),
)
BACKENDS = ("xla", "fused")


def _check_backend(value, name):
    if value not in BACKENDS:
        raise ValueError(f"{name} must be one of {', '.join(BACKENDS)}; got {value!r}")
    return value


OPTIONS = (Option("first_order", False, "first-order MAML (FOMAML): no gradient through the inner gradients",
                  type=bool), *INNER_OPTIONS,
           Option("backend", "xla", "how the meta-gradient is computed: xla (autodiff, any model) or fused (one "
                  "Pallas kernel per block of tasks, hand-derived second order; models.mlp with relu/tanh, "
                  "mse/sse loss, SGD inner steps)", type=str, check=_check_backend))


class InnerHyperParams(NamedTuple):
    """Meta-parameters of a MAML whose inner optimiser's hyperparameters are meta-learned."""

    params: Params
    hyper: dict[str, Any]  # name -> a scalar, or a tree like params (per parameter)


def _check_second_order(opt: Any) -> None:
    """Refuses an inner optimiser whose update has a non-finite derivative where a gradient is zero: plain
    ``optax.adam``'s √ν at ν = 0 makes every second-order meta-gradient NaN from the first step, which
    would otherwise be reported as a divergence with advice about rates."""
    try:
        probe = jnp.zeros((2,))
        slope = jax.jacfwd(lambda g: opt.update(g, opt.init(probe), probe)[0])(probe)
    except Exception:  # an optimiser that cannot update a plain vector: nothing to learn from the probe
        return
    if not bool(jnp.all(jnp.isfinite(slope))):
        raise ValueError("inner_optimiser: its update has a non-finite derivative where a gradient is zero (Adam's "
                         "and RMSprop's square root at 0, e.g. plain optax.adam), so every second-order "
                         "meta-gradient would be NaN. Use jmaml.inner_optimisers.adam (eps_root=1e-12 by default) "
                         "or optax.adam(..., eps_root=1e-12); or first_order=True")


def _traced_k(num_inner_steps: int, max_inner_steps: int | None) -> dict[str, int]:
    """k is a per-call hyperparameter (a population's traced k) of a learner built with max_inner_steps."""
    return {} if max_inner_steps is None else {"num_inner_steps": num_inner_steps}


def maml(loss_fn: LossFn, *, inner_lr: Any, num_inner_steps: int, first_order: bool = False,
         reduction: str = "mean", unroll: int | bool = 1, remat: bool = False,
         max_inner_steps: int | None = None, inner_optimiser: Any = None, inner_settings: Any = None,
         learn_inner_hyper: Any = (), per_parameter_hyper: bool = False, backend: str = "xla") -> MetaLearner:
    """MAML (second order) or, with ``first_order``, FOMAML.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_lr: α, the default of the per-call hyperparameter ``inner_lr`` (may be traced).
      num_inner_steps: k. With ``max_inner_steps`` (static) it is a per-call hyperparameter too, and
        may be traced (``jmaml.adapt``'s masked scan): sweeps vmap runs over k.
      first_order: FOMAML.
      reduction, unroll, remat: as in ``jmaml.make_step``.
      inner_optimiser: the inner update rule: None (SGD at ``inner_lr``), a ``jmaml.inner_optimisers``
        name (built at ``inner_lr`` with ``inner_settings``, a dict or ``"name=value,..."``), or any
        optax ``GradientTransformation`` (its state is per task, differentiated through; test-time
        adaptation uses it too). The per-call ``inner_lr`` then sets its ``learning_rate``.
      learn_inner_hyper: names (or ``"a,b"``) of the inner optimiser's hyperparameters to meta-learn:
        the meta-parameters become ``InnerHyperParams(params, hyper)``, and the outer optimiser trains
        the hyperparameters with θ. ``per_parameter_hyper``: one value per parameter (Meta-SGD is
        ``learning_rate`` learned this way; per-step values: build the optimiser with ``per_step=True``).
      backend: ``"xla"`` (autodiff through the inner loop; any model) or ``"fused"`` (``jmaml.fused``: a
        Pallas kernel with the second-order meta-gradient derived by hand, for a loss made by
        ``make_loss(models.mlp(...).apply, "mse" | "sse")`` with relu or tanh and plain SGD inner steps).

    A model with state (``Model.init_state``) works with a stateful loss (``make_loss(...,
    stateful=True)``): ``estimate`` and ``adapt`` then take ``model_state=`` and ``estimate`` returns
    the updated state as a fourth value (``jmaml.fit(..., model_state=...)`` threads it).

    Returns:
      A ``MetaLearner``; ``estimate(params, tasks, meta_step, *, inner_lr, num_inner_steps, model_state)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jmaml import learners, make_loss, models, tasks
      >>> loss = make_loss(models.linear().apply, "sse")
      >>> learner = learners.maml(loss, inner_lr=0.1, num_inner_steps=1, reduction="sum")
      >>> _, grad, _ = learner.estimate(jnp.array(1.0), tasks.seed.meta_tasks())
      >>> round(float(grad), 2)  # the seed's dL_Q1/dθ + dL_Q2/dθ = 4.48 + 3028.48
      3032.96

    Raises:
      ValueError/TypeError: bad inner settings or an unknown inner optimiser (named); ``backend="fused"``
        with a model, loss, activation or setting it does not support (naming what it supports).
    """
    _check_backend(backend, "backend")
    learn = _names(learn_inner_hyper) if isinstance(learn_inner_hyper, (str, type(None))) else tuple(learn_inner_hyper)
    if inner_settings and inner_optimiser is None:
        raise ValueError(f"inner_settings={inner_settings!r} without inner_optimiser: plain SGD has no settings; name "
                         "the inner optimiser they are for (--inner-optimiser momentum ...)")
    if per_parameter_hyper and not learn:
        raise ValueError("per_parameter_hyper=True without learn_inner_hyper: it says how the learned "
                         "hyperparameters are shaped; name them (--learn-inner-hyper learning_rate ...)")
    if backend == "fused":
        if inner_optimiser is not None or learn:
            raise ValueError("backend='fused' runs plain SGD inner steps; inner_optimiser and learn_inner_hyper "
                             "need backend='xla'")
        est = fused.maml_estimator(loss_fn, num_inner_steps=num_inner_steps, first_order=first_order,
                                   reduction=reduction, remat=remat, max_inner_steps=max_inner_steps)
    elif inner_optimiser is not None or learn:
        opt = inner_optimiser
        if opt is None or isinstance(opt, str):
            settings = _settings(inner_settings) if isinstance(inner_settings, (str, type(None))) else inner_settings
            opt = inner_optimisers.make(opt or "sgd", inner_lr, **settings)
        elif inner_settings:
            raise ValueError("inner_settings apply to an inner optimiser given by name; this one is already built")
        if not first_order:
            _check_second_order(opt)
        return _with_inner_optimiser(loss_fn, opt, learn, per_parameter_hyper, num_inner_steps=num_inner_steps,
                                     first_order=first_order, reduction=reduction, unroll=unroll, remat=remat,
                                     max_inner_steps=max_inner_steps)
    else:
        est = estimators.maml(loss_fn, num_inner_steps=num_inner_steps, first_order=first_order, reduction=reduction,
                              unroll=unroll, remat=remat, max_inner_steps=max_inner_steps)

    def estimate(params, tasks, meta_step=None, *, inner_lr=inner_lr, num_inner_steps=None, model_state=None):
        if max_inner_steps is None and num_inner_steps is not None:
            raise ValueError("num_inner_steps can be given per call only to a learner built with max_inner_steps")
        return est(params, tasks, inner_lr=inner_lr, meta_step=meta_step, num_inner_steps=num_inner_steps,
                   model_state=model_state)

    rates = lambda _, n, inner_lr=inner_lr: fixed_rates(inner_lr, n)
    stateless_adapt = rate_rule(loss_fn, rates)

    def adapt(params, support, num_steps, *, observe=None, inner_lr=inner_lr, model_state=None):
        if model_state is None:
            return stateless_adapt(params, support, num_steps, observe=observe, inner_lr=inner_lr)
        # a model with state: the state is threaded through the test-time steps as in training (a batch-norm
        # model's mode, in its state, decides whether its statistics are the batch's or the running ones)
        out = gradient_adapt(loss_fn, params, support, fixed_rates(inner_lr, num_steps), observe=observe,
                             model_state=model_state)
        return out if observe is not None else out[0]

    name = "fomaml" if first_order else "maml"
    return MetaLearner(reduction=reduction, init=lambda params: params, estimate=estimate, adapt=adapt, name=name,
                       label="FOMAML" if first_order else "MAML", exact_gradient=not first_order,
                       hyper={"inner_lr": inner_lr, **_traced_k(num_inner_steps, max_inner_steps)})


def _with_inner_optimiser(loss_fn: LossFn, opt: Any, learn: tuple[str, ...], per_parameter: bool, *,
                          num_inner_steps: int, first_order: bool, reduction: str, unroll: Any, remat: bool,
                          max_inner_steps: int | None) -> MetaLearner:
    """MAML whose inner loop is ``opt`` (any optax transformation), optionally meta-learning its
    hyperparameters ``learn``."""
    default_k = num_inner_steps
    core = {"first_order": first_order, "unroll": unroll, "remat": remat, "max_inner_steps": max_inner_steps,
            "inner_optimiser": opt}

    def init(params):
        if not learn:
            return params
        state = opt.init(params)
        available = getattr(state, "hyperparams", None)
        missing = sorted(set(learn) - set(available or {}))
        if not isinstance(available, dict) or missing:
            raise TypeError(f"learn_inner_hyper names {missing or list(learn)}, which this inner optimiser does not "
                            f"hold as injectable hyperparameters ({sorted(available or {})}); build it with "
                            "jmaml.inner_optimisers")
        spread = (lambda v: jax.tree.map(lambda p: jnp.full(p.shape, v, p.dtype), params)) if per_parameter \
            else (lambda v: v)
        return InnerHyperParams(params, {name: spread(available[name]) for name in learn})

    def split(meta_params, inner_lr, inner_hyper):
        """The model's parameters, and the hyperparameters to set: per-call ones (a sweep's), then
        the learned ones."""
        params, learned = (meta_params.params, dict(meta_params.hyper)) if learn else (meta_params, {})
        hyper = {**({} if inner_lr is None else {"learning_rate": inner_lr}), **(inner_hyper or {})}
        return params, {**hyper, **learned}

    def estimate(meta_params, tasks, meta_step=None, *, inner_lr=None, num_inner_steps=None, model_state=None,
                 inner_hyper=None):
        if max_inner_steps is None and num_inner_steps is not None:
            raise ValueError("num_inner_steps can be given per call only to a learner built with max_inner_steps")
        k = default_k if num_inner_steps is None else num_inner_steps
        extra = {} if model_state is None else {"model_state": model_state}

        def objective(mp):
            params, hyper = split(mp, inner_lr, inner_hyper)
            total, *aux = batched_objective(loss_fn, params, tasks, inner_lr=None, num_inner_steps=k,
                                            reduction=reduction, return_per_task=True, inner_hyper=hyper,
                                            **core, **extra)
            return total, tuple(aux)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(meta_params)
        params = meta_params.params if learn else meta_params
        metrics = {"task_losses": aux[0], "pre_adapt_loss": pre_adapt_loss(loss_fn, params, tasks, reduction,
                                                                           model_state)}
        if learn:  # what the learned hyperparameters are now (their mean, for per-parameter ones)
            for name, value in meta_params.hyper.items():
                metrics[f"inner_{name}"] = jnp.mean(jnp.stack([jnp.mean(v) for v in jax.tree.leaves(value)]))
        return (loss, grads, metrics, *aux[1:])

    def adapt(meta_params, support, num_steps, *, observe=None, inner_lr=None, model_state=None, inner_hyper=None):
        params, hyper = split(meta_params, inner_lr, inner_hyper)
        fixed = loss_fn if model_state is None else (lambda p, batch: loss_fn(p, batch, model_state)[0])
        return adapt_inner(fixed, params, support, inner_lr=None, num_steps=num_steps, inner_optimiser=opt,
                           inner_hyper=hyper, observe=observe)

    return MetaLearner(reduction=reduction, init=init, estimate=estimate, adapt=adapt,
                       name="fomaml" if first_order else "maml",
                       label="FOMAML" if first_order else "MAML", exact_gradient=not first_order,
                       hyper={"inner_lr": None, "inner_hyper": None, **_traced_k(default_k, max_inner_steps)},
                       model_params=(lambda mp: mp.params) if learn else (lambda mp: mp))


def fomaml(loss_fn: LossFn, **kwargs) -> MetaLearner:
    """First-order MAML: ``maml(..., first_order=True)``."""
    return maml(loss_fn, first_order=True, **kwargs)
