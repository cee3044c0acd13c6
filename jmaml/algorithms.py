"""The MAML family by name: what ``jmaml train --algo NAME`` meta-trains, and how its models adapt
at test time.

An ``Algorithm`` bundles an estimator (``jmaml.estimators``) with the two things a training loop and
an evaluation need besides it: how to build its meta-parameters from a model's initial parameters
(Meta-SGD and MAML++ add learned rates), and the rule a trained model adapts by on a new task —
written for every algorithm as per-step rate trees plus a proximal strength::

    φ ← φ − r_t ⊙ (∇L_S(φ) + λ (φ − θ))      t = 0, 1, ...

MAML, FOMAML and Reptile use r_t = α; ANIL α on the selected layers and 0 elsewhere; Meta-SGD its
learned per-parameter rates; MAML++ its learned rates of step t (the last step's beyond the k it was
trained with); iMAML α with its λ (λ = 0 for all others).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jmaml import estimators
from jmaml.types import LossFn, Params

ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil", "mamlpp", "imaml")
ALGORITHM_LABELS = {"maml": "MAML", "fomaml": "FOMAML", "reptile": "Reptile", "metasgd": "Meta-SGD",
                    "anil": "ANIL", "mamlpp": "MAML++", "imaml": "iMAML"}
LEARNED_RATES = ("metasgd", "mamlpp")  # meta-parameters (params, inner_lr): the inner rates are learned


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


class Algorithm(NamedTuple):
    """A meta-learning algorithm ready for ``make_estimator_step`` and for evaluation."""

    name: str
    estimator: estimators.Estimator
    hyper: dict[str, Any]  # keyword arguments for the estimator (``make_estimator_step`` defaults)
    init: Callable[[Params], Any]  # model parameters -> meta-parameters
    model_params: Callable[[Any], Params]  # meta-parameters -> the model's initial parameters θ
    step_rates: Callable[[Any, int], Params]  # (meta-params, n) -> rates per test step, leading axis n
    prox_lambda: float  # the proximal strength of the test-time update (iMAML's λ, else 0)


def check_algorithm(name: str) -> str:
    if name not in ALGORITHMS:
        raise ValueError(f"algo must be one of {', '.join(ALGORITHMS)}; got {name!r}")
    return name


def _fixed_rates(inner_lr: float) -> Callable[[Any, int], Params]:
    return lambda _, n: jnp.full((n,), inner_lr, jnp.float32)


def make_algorithm(name: str, loss_fn: LossFn, *, inner_lr: float, num_inner_steps: int,
                   first_order: bool = False, imaml_lambda: float = 1.0, imaml_cg_iters: int = 5,
                   mamlpp_msl: bool = True, mamlpp_msl_anneal_steps: int | None = None,
                   mamlpp_first_order_steps: int = 0, anil_mask: estimators.MaskSpec = None,
                   reduction: str = "mean", unroll: int | bool = 1, remat: bool = False) -> Algorithm:
    """Builds the named algorithm.

    Args:
      name: one of ``ALGORITHMS``.
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_lr: α (Meta-SGD's and MAML++'s initial rates).
      num_inner_steps: k at meta-training time.
      first_order: FOMAML for ``"maml"`` (``"fomaml"`` sets it).
      imaml_lambda, imaml_cg_iters: iMAML's λ and conjugate-gradient iterations.
      mamlpp_msl, mamlpp_msl_anneal_steps, mamlpp_first_order_steps: MAML++'s multi-step loss, the
        meta-steps its weights anneal over, and the meta-steps of first-order gradients.
      anil_mask: ANIL's mask (default: the last layer).
      reduction, unroll, remat: as in ``jmaml.make_step`` (``remat`` only for the algorithms that
        differentiate through the inner loop: MAML, FOMAML, Meta-SGD, ANIL, Reptile).

    Raises:
      ValueError: an unknown name or an invalid combination of settings.
    """
    check_algorithm(name)
    if first_order and name != "maml" and name != "fomaml":
        raise ValueError(f"first_order applies to algo 'maml' only (or use algo 'fomaml'); got algo {name!r}")
    if remat and name in ("mamlpp", "imaml"):
        raise ValueError(f"remat is not available for algo {name!r}: iMAML keeps nothing per inner step "
                         "anyway, and MAML++ unrolls its per-step rates")
    adapt_kwargs = {"unroll": unroll, "remat": remat}
    fixed = {"inner_lr": inner_lr}
    identity = lambda p: p
    if name in ("maml", "fomaml"):
        est = estimators.maml(loss_fn, num_inner_steps=num_inner_steps, reduction=reduction,
                              first_order=first_order or name == "fomaml", **adapt_kwargs)
        return Algorithm(name, est, fixed, identity, identity, _fixed_rates(inner_lr), 0.0)
    if name == "reptile":
        est = estimators.reptile(loss_fn, num_inner_steps=num_inner_steps, **adapt_kwargs)
        return Algorithm(name, est, fixed, identity, identity, _fixed_rates(inner_lr), 0.0)
    if name == "anil":
        est = estimators.anil(loss_fn, num_inner_steps=num_inner_steps, mask=anil_mask, reduction=reduction,
                              **adapt_kwargs)
        rates = lambda mp, n: jax.tree.map(lambda r: jnp.broadcast_to(r, (n,)),
                                           estimators.anil_rates(mp, inner_lr, anil_mask))
        return Algorithm(name, est, fixed, identity, identity, rates, 0.0)
    if name == "metasgd":
        est = estimators.meta_sgd(loss_fn, num_inner_steps=num_inner_steps, reduction=reduction, **adapt_kwargs)
        rates = lambda mp, n: jax.tree.map(lambda r: jnp.broadcast_to(r, (n, *r.shape)), mp.inner_lr)
        return Algorithm(name, est, {}, lambda p: estimators.meta_sgd_init(p, inner_lr),
                         lambda mp: mp.params, rates, 0.0)
    if name == "mamlpp":
        est = estimators.mamlpp(loss_fn, num_inner_steps=num_inner_steps, multi_step_loss=mamlpp_msl,
                                msl_anneal_steps=mamlpp_msl_anneal_steps,
                                first_order_steps=mamlpp_first_order_steps, reduction=reduction,
                                unroll=unroll)
        last = num_inner_steps - 1
        rates = lambda mp, n: jax.tree.map(lambda r: r[jnp.minimum(jnp.arange(n), last)], mp.inner_lr)
        return Algorithm(name, est, {}, lambda p: estimators.mamlpp_init(p, inner_lr, num_inner_steps),
                         lambda mp: mp.params, rates, 0.0)
    est = estimators.imaml(loss_fn, num_inner_steps=num_inner_steps, lam=imaml_lambda, cg_iters=imaml_cg_iters,
                           reduction=reduction, unroll=unroll)
    return Algorithm(name, est, fixed, identity, identity, _fixed_rates(inner_lr), float(imaml_lambda))
