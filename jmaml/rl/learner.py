r"""MAML for reinforcement learning: the inner loop rolls out the policy and takes policy-gradient steps,
the meta-objective is the return of the adapted policy.

The objective of one task is :math:`J(\theta) = E_{\tau \sim \pi_\theta}[F(\theta, \tau)]`, with
:math:`F(\theta, \tau) = J_{out}(\theta + \alpha \hat g(\theta, \tau))` the expected return of the policy
adapted on the sampled episodes :math:`\tau` (``inner_episodes`` of them; k steps sample k batches in
turn). Its gradient has two terms:

.. math::
   \nabla J = E_\tau\big[(I + \alpha \nabla \hat g)^\top \nabla J_{out}(\theta')\big]
            + E_\tau\big[F(\theta, \tau)\, \nabla_\theta \log p_\theta(\tau)\big].

Differentiating through the inner policy-gradient step gives the first. The second one, which comes through
the sampling distribution of the inner episodes, is what naive MAML-RL implementations drop (Foerster et
al., DiCE, 2018; Rothfuss et al., ProMP, 2019). ``estimator="dice"`` keeps it exactly as the
DiCE objective's first derivative does: the surrogate adds
:math:`-\mathrm{sg}(\hat F - b)\sum_j \log p_{\phi_j(\theta)}(\tau_j)`, where :math:`\hat F` is the outer
episodes' discounted return and :math:`b` is a baseline that does not depend on the task's own samples (the
mean of the other tasks' :math:`\hat F` in the meta-batch, which keeps it unbiased).
``estimator="lvc"`` is ProMP's low-variance curvature estimator: the inner step differentiated through each
step's likelihood ratio, which keeps the per-step part of that term and drops its cross-step part -- biased,
with far less variance than DiCE's sum over whole episodes; what training uses by default.
``estimator="naive"`` drops the term, for comparison. ``first_order=True`` also stops the gradient through
:math:`\hat g` (first-order MAML). ``tests/rl_test.py`` checks both estimators against the exact
meta-gradient of a bandit, enumerated in float64.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jmaml.core import protocols
from jmaml.core._checks import check_num_steps, check_positive_finite, check_positive_int, check_rate
from jmaml.core.estimators import _tree_vdot, conjugate_gradient
from jmaml.rl import rollouts
from jmaml.rl.envs import Env
from jmaml.rl.policies import Policy

ESTIMATORS = ("dice", "lvc", "naive")
OUTERS = ("gradient", "trpo", "ppo")


def trpo_optimiser() -> protocols.ApplyStep:
    """The meta-optimiser of ``maml_rl(..., outer="trpo")`` (and ``"ppo"``), whose estimate is the step
    itself: ``jmaml.apply_step()`` (SGD at rate 1), the only optimiser ``fit`` accepts for them."""
    return protocols.apply_step()


class RLTask(NamedTuple):
    """One task (or a batch, with a leading task axis): the environment's parameters and the key its
    episodes are drawn with, so a run's rollouts are a function of the run's key alone.

    For evaluation a single task has a ``support`` (the task with the key its adaptation's episodes are
    drawn with) and a ``query`` (the task with the key of the episodes that score the adapted policy):
    ``jmaml.evaluate.evaluate`` treats it as it treats a supervised task (see ``return_metric``)."""

    params: Any
    key: jax.Array

    @property
    def support(self) -> RLTask:
        return RLTask(self.params, jax.random.split(self.key)[0])

    @property
    def query(self) -> RLTask:
        return RLTask(self.params, jax.random.split(self.key)[1])


def task_distribution(env: Env, name: str | None = None) -> protocols.TaskDistribution:
    """The tasks of ``env`` as a ``TaskDistribution``: ``sample(key, n)`` draws n tasks' parameters and a
    rollout key each; held-out tasks come from the same distribution (other keys). Its metric is the return
    (higher is better)."""
    def sample(key, num_tasks):
        k_tasks, k_roll = jax.random.split(key)
        return RLTask(jax.vmap(env.sample_task)(jax.random.split(k_tasks, num_tasks)),
                      jax.random.split(k_roll, num_tasks))

    return protocols.TaskDistribution(sample=sample, heldout=sample, name=name or env.name, metric_name="return",
                                      higher_is_better=True)


def check_policy(env: Env, policy: Policy) -> None:
    """A ValueError naming both when the policy's actions or observations do not fit the environment."""
    if policy.num_actions != env.num_actions or tuple(policy.action_shape) != tuple(env.action_shape):
        what = lambda n, s: f"{n} discrete actions" if n is not None else f"continuous actions of shape {s}"  # noqa: E731
        raise ValueError(f"the policy's actions do not fit environment {env.name!r}: the policy takes "
                         f"{what(policy.num_actions, tuple(policy.action_shape))}, the environment "
                         f"{what(env.num_actions, tuple(env.action_shape))}")
    if tuple(policy.observation_shape) != tuple(env.observation_shape):
        raise ValueError(f"the policy reads observations of shape {tuple(policy.observation_shape)}, environment "
                         f"{env.name!r} gives {tuple(env.observation_shape)}")


def _check_unit(value: Any, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    """A Python real number in [0, 1] (an end excluded where asked); a ValueError naming it otherwise."""
    low, high = "(" if low_open else "[", ")" if high_open else "]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in {low}0, 1{high}, got {value!r}")
    v = float(value)
    if not (0 < v if low_open else 0 <= v) or not (v < 1 if high_open else v <= 1):
        raise ValueError(f"{name} must be a number in {low}0, 1{high}, got {value!r}")
    return v


def _check_nonnegative_finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _rate_at(alpha: Any, j: int, num_steps: int) -> Any:
    """Step ``j``'s inner rate: ``alpha`` itself, or its j-th entry for a schedule (a 1-D array of
    ``num_steps`` rates, one per step, e.g. the paper's test-time α then α/2)."""
    if jnp.ndim(alpha) == 0:
        return alpha
    if jnp.ndim(alpha) != 1 or jnp.shape(alpha)[0] != num_steps:
        raise ValueError(f"inner_lr must be a number or a schedule of one rate per step (shape ({num_steps},)), "
                         f"got shape {jnp.shape(alpha)}")
    return alpha[j]


def maml_rl(env: Env, policy: Policy, *, inner_lr: float = 0.1, num_inner_steps: int = 1, inner_episodes: int = 20,
            outer_episodes: int = 20, gamma: float = 0.99, gae_lambda: float = 1.0, baseline: str | None = "linear",
            normalize_advantages: bool = True, estimator: str = "lvc", first_order: bool = False,
            score_baseline: bool = True, outer: str = "gradient", max_kl: float = 0.01, cg_iters: int = 10,
            cg_damping: float = 1e-5, cg_tol: float = 1e-10, line_search_steps: int = 15,
            backtrack_ratio: float = 0.8, ppo_clip: float = 0.2, ppo_epochs: int = 5,
            ppo_lr: float = 1e-3) -> protocols.MetaLearner:
    r"""MAML with a policy-gradient inner loop, as a ``MetaLearner`` for ``jmaml.fit`` on
    ``task_distribution(env)``.

    What each estimator is unbiased for. The adaptation φ(θ, τ) is the inner rule as configured (its
    advantages with the fitted baseline, normalised or not, γ-discounted returns-to-go): a fixed function of
    θ and the inner episodes τ, so every setting of it defines a valid meta-objective.

    * ``"dice"``: unbiased for :math:`\nabla_\theta E_{\tau \sim p_\theta}[J_\gamma(\varphi(\theta, \tau))]`,
      :math:`J_\gamma` the adapted policy's expected discounted return :math:`E[\sum_t \gamma^t r_t]`, with
      every setting ``maml_rl`` accepts. Its outer term is the policy gradient of :math:`J_\gamma` itself:
      :math:`\gamma^t (G_t - b_t)` with a baseline that does not depend on the outer episodes (the linear
      feature baseline fitted to the last inner batch's episodes; none when ``num_inner_steps=0``), never
      normalised (``normalize_advantages`` normalises the inner steps' advantages, part of φ's definition);
      its score term weighs the inner episodes' log-likelihoods by the outer episodes' discounted return, so
      both terms estimate the gradient of one objective.
    * ``"lvc"`` (ProMP's low-variance curvature estimator, the default) and ``"naive"``: biased for that
      gradient. Both hold the inner samples' probabilities fixed (``"lvc"`` keeps each step's own likelihood
      ratio curvature, ``"naive"`` none), and their outer term is the usual practical policy gradient:
      γ-discounted returns-to-go without the :math:`\gamma^t` factor, the baseline fitted to the outer
      episodes themselves, normalised with ``normalize_advantages``. Their expectations are checked exactly
      on a bandit in ``tests/rl_test.py``.

    Args:
      env, policy: the environment family and the policy (``check_policy`` says whether they fit).
      inner_lr: α of the inner REINFORCE step, finite and > 0 (a per-call hyperparameter, so sweeps vmap over
        it; at test time ``adapt`` also takes a schedule, one rate per step).
      num_inner_steps: inner policy-gradient steps, each on ``inner_episodes`` fresh episodes; 0 trains the
        policy itself on every task (multi-task policy gradient: the "pretrained" baseline).
      outer_episodes: episodes of the adapted policy per task for the meta-objective.
      gamma, gae_lambda, baseline, normalize_advantages: the advantages (``rollouts.advantages``) of
        both loops (DiCE's outer term: see above); the paper's: γ = 0.99, the linear feature baseline, λ = 1.
      estimator: ``"lvc"``, ``"dice"`` or ``"naive"`` (see above).
      first_order: no gradient through the inner policy gradient.
      score_baseline: centre DiCE's score term on the other tasks' mean return (it stays unbiased; False: no
        baseline).
      outer: ``"gradient"``: ``estimate`` returns the meta-gradient for any optax optimiser (Adam ...).
        ``"trpo"``: the paper's outer step (as cbfinn/maml_rl, rllab, garage, ProMP and pytorch-maml-rl
        define it), all on the device: the trust region is the mean over the outer episodes' states of the
        analytic ``KL(π_{φ(θ_old)} ‖ π_{φ(θ)})`` between the old and new adapted policies (``policy.kl``);
        the natural gradient comes from conjugate gradient (at most ``cg_iters`` iterations, stopping at the
        relative residual ``cg_tol``) on that KL's Hessian at θ_old -- positive semi-definite (Gauss-Newton
        form), damped by ``cg_damping`` -- as Fisher-vector products; it is scaled to ``max_kl`` and
        backtracked (``backtrack_ratio``, at most ``line_search_steps`` times) until the importance-weighted
        surrogate improves with the KL within ``max_kl``. ``estimate`` returns the step itself
        (``θ_old - θ_new``, ``returns_step``): train with ``trpo_optimiser()`` (``jmaml.apply_step()``; fit
        refuses any other). ``kl`` among its metrics is the accepted step's analytic KL, ``cg_residual`` and
        ``line_search_steps`` (0: no step was accepted) the solver's.
        ``"ppo"``: PPO-clip (Schulman et al., 2017) as ProMP uses it for meta-RL -- ``ppo_epochs`` steps of
        Adam at ``ppo_lr`` (its state fresh at every meta-step) on the clipped surrogate
        ``min(r A, clip(r, 1 - ppo_clip, 1 + ppo_clip) A)``, r the ratio of the re-adapted policy to the
        sampling one on the outer episodes, all on the samples drawn at θ_old and inside one compiled step;
        like ``"trpo"``, ``estimate`` returns the step itself; ``kl`` (analytic where the policy has one) is
        among its metrics. Both take "lvc" or "naive".

    Returns:
      A ``MetaLearner`` whose loss is minus the adapted policy's mean (undiscounted) return over the
      outer episodes; ``task_losses`` per task, ``pre_adapt_loss`` minus the un-adapted policy's return
      (the first inner batch's), and ``return_pre``/``return_post``. Its gradient is the surrogate's
      (``exact_gradient`` is False: an estimate).

    Raises:
      ValueError: a policy that does not fit; any setting out of range, each named (counts < 1, γ or λ
        outside [0, 1], a rate, trust region, clip or learning rate that is not finite and > 0, a damping or
        tolerance < 0, a backtrack ratio outside (0, 1)); an unknown estimator or outer step; TRPO with a
        policy that has no analytic KL.
    """
    check_policy(env, policy)
    k = check_num_steps(num_inner_steps, "num_inner_steps")
    n_in = check_positive_int(inner_episodes, "inner_episodes")
    n_out = check_positive_int(outer_episodes, "outer_episodes")
    gamma, gae_lambda = _check_unit(gamma, "gamma"), _check_unit(gae_lambda, "gae_lambda")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if outer not in OUTERS:
        raise ValueError(f"outer must be one of {OUTERS}, got {outer!r}")
    if baseline not in ("linear", None):
        raise ValueError(f"baseline must be 'linear' or None, got {baseline!r}")
    for value, name in ((normalize_advantages, "normalize_advantages"), (first_order, "first_order"),
                        (score_baseline, "score_baseline")):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    check_rate(inner_lr, "inner_lr", allow_zero=False)
    if jnp.ndim(inner_lr) != 0:
        raise ValueError(f"inner_lr must be one number here (a per-step schedule goes to adapt), got {inner_lr!r}")
    max_kl = check_positive_finite(max_kl, "max_kl")
    cg_iters = check_positive_int(cg_iters, "cg_iters")
    cg_damping = _check_nonnegative_finite(cg_damping, "cg_damping")
    cg_tol = _check_nonnegative_finite(cg_tol, "cg_tol")
    line_search_steps = check_positive_int(line_search_steps, "line_search_steps")
    backtrack_ratio = _check_unit(backtrack_ratio, "backtrack_ratio", low_open=True, high_open=True)
    ppo_clip = check_positive_finite(ppo_clip, "ppo_clip")
    ppo_epochs = check_positive_int(ppo_epochs, "ppo_epochs")
    ppo_lr = check_positive_finite(ppo_lr, "ppo_lr")
    if outer != "gradient" and estimator == "dice":
        raise ValueError(f"outer={outer!r} takes estimator 'lvc' or 'naive' (the DiCE score term has no "
                         "importance-weighted surrogate)")
    if outer != "gradient" and k == 0:
        raise ValueError(f"outer={outer!r} needs num_inner_steps >= 1 here; train the pretrained policy with "
                         "outer='gradient'")
    if outer == "trpo" and policy.kl is None:
        raise ValueError("outer='trpo' constrains the analytic KL between the old and new policies: this policy "
                         "has no kl(old_params, new_params, obs) (Policy.kl)")

    def adv(traj):
        return rollouts.advantages(traj, gamma, baseline=baseline, gae_lambda=gae_lambda,
                                   normalize=normalize_advantages)

    def pg_loss(params, traj, a):
        """The REINFORCE surrogate of minus the return: minus the mean over episodes of Σ_t log π(a_t|s_t) A_t
        (its gradient estimates minus the return's)."""
        return -jnp.sum(rollouts.log_probs(policy, params, traj) * a) / traj.rewards.shape[0]

    def inner_loss(params, traj, a):
        """The inner step's surrogate: ``pg_loss`` over the horizon -- a mean over the episodes' steps, as
        pytorch-maml-rl's, so that α does not scale with the horizon."""
        return pg_loss(params, traj, a) / traj.rewards.shape[1]

    def lvc_loss(params, traj, a):
        """ProMP's low-variance curvature surrogate: ``inner_loss`` with each step's likelihood ratio
        π/sg(π) in place of log π -- the same gradient, and a Hessian with each step's own score
        outer product (the term through the sampling distribution, without its cross-step terms)."""
        lp = rollouts.log_probs(policy, params, traj)
        ratio = jnp.exp(lp - jax.lax.stop_gradient(lp)) * traj.mask
        return -jnp.sum(ratio * a) / (traj.rewards.shape[0] * traj.rewards.shape[1])

    def inner_step(params, traj, alpha, a=None):
        a = adv(traj) if a is None else a
        g = jax.grad(lvc_loss if estimator == "lvc" else inner_loss)(params, traj, a)
        if first_order:
            g = jax.lax.stop_gradient(g)
        return jax.tree.map(lambda p, gi: p - alpha * gi, params, g)

    def inner_loop(params, task, alpha, num_steps, observe=None):
        """The one inner loop of training and test time: ``num_steps`` policy-gradient steps on one task, each
        on ``inner_episodes`` fresh episodes of the current policy (the j-th drawn with the j-th of
        ``num_steps + 1`` keys split from the task's; step j at rate ``_rate_at(alpha, j)``). Returns the
        adapted policy, each step's ``(policy, episodes, advantages)``, the last key (the outer episodes')
        and ``observe`` of each policy before a step."""
        keys = jax.random.split(task.key, num_steps + 1)
        phi, batches, seen = params, [], []
        for j in range(num_steps):
            if observe is not None:
                seen.append(observe(phi))
            traj = rollouts.rollout(env, policy, phi, task.params, keys[j], n_in)
            a = adv(traj)
            batches.append((phi, traj, a))
            phi = inner_step(phi, traj, _rate_at(alpha, j, num_steps), a)
        return phi, batches, keys[num_steps], seen

    def sample(params, tasks, alpha):
        """Every task's episodes at θ_old, the data an outer step that reuses its samples (TRPO's line search,
        PPO's epochs) works on: the inner batches with their advantages, the outer episodes with theirs, their
        log-probabilities under the old adapted policy and that policy, and the returns before and after
        adaptation."""
        def one(task):
            phi, batches, key_out, _ = inner_loop(params, task, alpha, k)
            traj = rollouts.rollout(env, policy, phi, task.params, key_out, n_out)
            old = jax.lax.stop_gradient(rollouts.log_probs(policy, phi, traj))
            ret_pre = jnp.mean(jnp.sum(batches[0][1].rewards, axis=1))
            return [(t, a) for _, t, a in batches], (traj, adv(traj), old, jax.lax.stop_gradient(phi)), ret_pre, \
                jnp.mean(jnp.sum(traj.rewards, axis=1))

        return jax.vmap(one)(tasks)

    def readapted(p, inner, traj, old_lp, old_phi, alpha):
        """On every outer step: ``log π_{φ(p)}(a|s) - log π_{φ(θ_old)}(a|s)`` and, where the policy has one,
        the analytic ``KL(π_{φ(θ_old)}(·|s) ‖ π_{φ(p)}(·|s))`` (masked; else None), φ(p) re-adapted from p
        on the inner batches sampled at θ_old (through ``inner_step``, so the estimator's curvature term is
        kept)."""
        def one(inner_i, traj_i, old_i):
            phi = p
            for j, (t_j, a_j) in enumerate(inner_i):
                phi = inner_step(phi, t_j, _rate_at(alpha, j, k), a_j)
            lp = rollouts.log_probs(policy, phi, traj_i)
            if policy.kl is None:
                return lp, None
            kl = jax.vmap(jax.vmap(policy.kl, (None, None, 0)), (None, None, 0))(old_i, phi, traj_i.obs)
            return lp, kl * traj_i.mask

        lp, kl = jax.vmap(one)(inner, traj, old_phi)
        return lp - old_lp, kl

    def sampled_metrics(ret_pre, ret_post):
        return {"task_losses": -ret_post, "pre_adapt_loss": -jnp.mean(ret_pre), "return_pre": jnp.mean(ret_pre),
                "return_post": jnp.mean(ret_post)}

    def trpo_estimate(params, tasks, alpha):
        """The paper's TRPO outer step on a meta-batch (see ``outer``); returns (loss, θ_old - θ_new, metrics)."""
        inner, (traj, a_out, old_lp, old_phi), ret_pre, ret_post = sample(params, tasks, alpha)
        count = jnp.maximum(jnp.sum(traj.mask), 1.0)

        def loss_and_kl(p):
            log_r, kl = readapted(p, inner, traj, old_lp, old_phi, alpha)
            ratio = jnp.exp(log_r) * traj.mask
            loss = -jnp.mean(jnp.sum(ratio * a_out, axis=(1, 2)) / traj.rewards.shape[1])
            return loss, jnp.sum(kl) / count

        (loss0, _), g = jax.value_and_grad(loss_and_kl, has_aux=True)(params)
        # the Fisher-vector product: the analytic KL's Hessian at θ_old (forward over reverse), linearised once
        _, hvp = jax.linearize(jax.grad(lambda p: loss_and_kl(p)[1]), params)

        def fisher(v):
            return jax.tree.map(lambda h, vi: h + cg_damping * vi, hvp(v), v)

        neg_g = jax.tree.map(jnp.negative, g)
        s, residual = conjugate_gradient(fisher, neg_g, cg_iters, cg_tol)
        shs = _tree_vdot(s, fisher(s))
        scale = jnp.sqrt(2 * max_kl / jnp.maximum(shs, 1e-12))
        full = jax.tree.map(lambda si: scale * si, s)

        def candidate(j):
            frac = backtrack_ratio ** j.astype(loss0.dtype)
            return jax.tree.map(lambda p, f: p + frac * f, params, full)

        def not_done(carry):
            j, ok, _ = carry
            return (j < line_search_steps) & ~ok

        def try_step(carry):
            j, _, _ = carry
            loss, kl = loss_and_kl(candidate(j))
            ok = (loss < loss0) & (kl <= max_kl) & jnp.isfinite(loss) & jnp.isfinite(kl)
            return jnp.where(ok, j, j + 1), ok, jnp.where(ok, kl, 0.0)

        zero = jnp.zeros((), loss0.dtype)
        j, ok, kl = jax.lax.while_loop(not_done, try_step, (jnp.zeros((), jnp.int32), jnp.zeros((), bool), zero))
        new = jax.tree.map(lambda c, p: jnp.where(ok, c, p), candidate(j), params)
        step = jax.tree.map(lambda p, n: p - n, params, new)
        metrics = {**sampled_metrics(ret_pre, ret_post), "line_search_steps": jnp.where(ok, j + 1, 0),
                   "cg_residual": residual, "kl": kl}
        return -jnp.mean(ret_post), step, metrics

    def ppo_estimate(params, tasks, alpha):
        """The PPO-clip outer step (see ``outer``); returns (loss, θ_old - θ_new, metrics)."""
        import optax

        inner, (traj, a_out, old_lp, old_phi), ret_pre, ret_post = sample(params, tasks, alpha)
        count = jnp.maximum(jnp.sum(traj.mask), 1.0)

        def clipped(p):
            log_r, kl = readapted(p, inner, traj, old_lp, old_phi, alpha)
            ratio = jnp.exp(log_r)
            surrogate = jnp.minimum(ratio * a_out, jnp.clip(ratio, 1 - ppo_clip, 1 + ppo_clip) * a_out)
            kl = jnp.sum(-log_r * traj.mask) if kl is None else jnp.sum(kl)
            return -jnp.sum(surrogate * traj.mask) / count, kl / count

        opt = optax.adam(ppo_lr)

        def epoch(_, carry):
            p, opt_state = carry
            g, _ = jax.grad(clipped, has_aux=True)(p)
            updates, opt_state = opt.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state

        new, _ = jax.lax.fori_loop(0, ppo_epochs, epoch, (params, opt.init(params)))
        _, kl = clipped(new)
        step = jax.tree.map(lambda p, n: p - n, params, new)
        return -jnp.mean(ret_post), step, {**sampled_metrics(ret_pre, ret_post), "kl": kl}

    def dice_outer_weights(traj, batches):
        """DiCE's outer term's weights: γ^t (G_t − b_t), b the linear baseline fitted to the last inner batch
        (independent of these episodes given it, so the term stays unbiased) or 0."""
        returns = rollouts.returns_to_go(traj.rewards, gamma)
        if baseline == "linear" and batches:
            _, t_in, _ = batches[-1]
            weights = rollouts.fit_linear_baseline(t_in, rollouts.returns_to_go(t_in.rewards, gamma))
            returns = returns - rollouts.predict_linear_baseline(traj, weights)
        discount = gamma ** jnp.arange(traj.rewards.shape[1], dtype=traj.rewards.dtype)
        return jax.lax.stop_gradient(returns * discount[None, :] * traj.mask)

    def per_task(params, task, alpha):
        phi, batches, key_out, _ = inner_loop(params, task, alpha, k)
        score = sum(jnp.sum(rollouts.log_probs(policy, phi_j, t)) for phi_j, t, _ in batches)  # Σ log p_{φ_j(θ)}(τ_j)
        traj = rollouts.rollout(env, policy, phi, task.params, key_out, n_out)
        outer = pg_loss(phi, traj, dice_outer_weights(traj, batches) if estimator == "dice" else adv(traj))
        value = jnp.mean(rollouts.discounted_return(traj.rewards, gamma))
        ret_post = jnp.mean(jnp.sum(traj.rewards, axis=1))
        ret_pre = jnp.mean(jnp.sum(batches[0][1].rewards, axis=1)) if batches else ret_post
        return outer, score, value, ret_post, ret_pre

    def estimate(params, tasks, meta_step=None, *, inner_lr=inner_lr):
        if outer == "trpo":
            return trpo_estimate(params, tasks, inner_lr)
        if outer == "ppo":
            return ppo_estimate(params, tasks, inner_lr)

        def surrogate(p):
            outer, score, value, ret_post, ret_pre = jax.vmap(per_task, (None, 0, None))(p, tasks, inner_lr)
            total = outer
            if estimator == "dice":
                value = jax.lax.stop_gradient(value)
                n = value.shape[0]
                b = (jnp.sum(value) - value) / max(n - 1, 1) if score_baseline and n > 1 else 0.0
                total = outer - (value - b) * score
            return jnp.mean(total), (ret_post, ret_pre)

        (_, (ret_post, ret_pre)), grads = jax.value_and_grad(surrogate, has_aux=True)(params)
        return -jnp.mean(ret_post), grads, sampled_metrics(ret_pre, ret_post)

    def adapt(params, task, num_steps, *, observe=None, inner_lr=inner_lr):
        """``num_steps`` inner policy-gradient steps on one ``RLTask`` (each on ``inner_episodes`` episodes),
        at ``inner_lr``: one rate, or a schedule of ``num_steps`` rates (the paper's test-time α, α/2, ...)."""
        phi, _, _, seen = inner_loop(params, task, inner_lr, num_steps, observe)
        if observe is None:
            return phi
        return phi, jax.tree.map(lambda *v: jnp.stack(v), *seen, observe(phi))

    name = ("maml_rl" if estimator == "lvc" else f"maml_rl_{estimator}") if k else "pretrained_rl"
    name += "" if outer == "gradient" else f"_{outer}"
    label = f"MAML-RL ({estimator}{'' if outer == 'gradient' else ', ' + outer.upper()})"
    return protocols.MetaLearner(init=lambda p: p, estimate=estimate, adapt=adapt, name=name, label=label,
                                 exact_gradient=False, hyper={"inner_lr": inner_lr},
                                 reduction="mean", returns_step=outer != "gradient")
