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

ESTIMATORS = ("dice", "lvc", "naive", "emaml")
TRPO_FISHERS = ("gauss_newton", "hessian")  # how TRPO's Fisher-vector products are computed (same matrix)
OUTERS = ("gradient", "trpo", "ppo", "promp")
# ProMP's own settings (Rothfuss et al. 2019; jonasrothfuss/ProMP's run scripts): its clip range and its fixed
# penalty on the inner steps' KL; PPO's clip range is 0.2 (Schulman et al. 2017)
PROMP_CLIP, PPO_CLIP, PROMP_INNER_KL_PENALTY = 0.3, 0.2, 5e-4


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
            backtrack_ratio: float = 0.8, trpo_fisher: str = "gauss_newton", cg_subsample: float = 1.0,
            ppo_clip: float | None = None,
            ppo_epochs: int = 5, ppo_lr: float = 1e-3,
            inner_kl_penalty: float = PROMP_INNER_KL_PENALTY) -> protocols.MetaLearner:
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
    * ``"emaml"``: E-MAML (Stadie et al., 2018) as ProMP's reference implements it (``emaml``): ``"naive"``'s
      inner step and outer term, plus the exploration term that credits the pre-update policy's samples with
      the post-update return: each task's mean log-likelihood of its first inner batch under θ, times minus
      that task's mean post-update reward standardised over the meta-batch's rewards (mean and standard
      deviation of every valid step's reward). Outer steps "gradient" and "trpo" (E-MAML-TRPO, its paper's).
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
        ``line_search_steps`` (0: no step was accepted) the solver's. ``trpo_fisher``: how the Fisher-vector
        products are computed -- ``"gauss_newton"`` (default) as Jᵀ H J, J the re-adaptation's Jacobian and H
        the KL's Hessian in the adapted parameters (exact at θ_old, where the KL's gradient in them is zero),
        ``"hessian"`` as forward over reverse of the KL's gradient through the re-adaptation; the same matrix,
        the first one order of differentiation cheaper (BENCHMARKS.md). ``cg_subsample``: the fraction of the
        meta-batch's tasks (the first ones; tasks are drawn independently) whose states make the Fisher metric of
        the conjugate gradient and its step scale, as rllab's ``subsample_factor`` (default 1: every task, the
        paper's); the line search keeps the whole batch's KL.
        ``"ppo"``: PPO-clip (Schulman et al., 2017) as ProMP uses it for meta-RL -- ``ppo_epochs`` steps of
        Adam at ``ppo_lr`` (its state fresh at every meta-step) on the clipped surrogate
        ``min(r A, clip(r, 1 - ppo_clip, 1 + ppo_clip) A)``, r the ratio of the re-adapted policy to the
        sampling one on the outer episodes, all on the samples drawn at θ_old and inside one compiled step;
        like ``"trpo"``, ``estimate`` returns the step itself; ``kl`` (analytic where the policy has one) is
        among its metrics. Both take "lvc" or "naive".
        ``"promp"``: ProMP (Rothfuss et al., 2019): ``"ppo"``'s clipped surrogate (``ppo_clip`` default 0.3,
        ProMP's; 0.2 for ``"ppo"``) plus ``inner_kl_penalty`` (default 5e-4, fixed, as its experiments) times
        the mean over the inner steps of the analytic KL between each inner batch's sampling policy and its
        re-adapted one on that batch's states, the trust region of the pre-update policies; with "lvc", its
        estimator (``promp``). ``inner_kl`` among its metrics.

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
    if trpo_fisher not in TRPO_FISHERS:
        raise ValueError(f"trpo_fisher must be one of {TRPO_FISHERS}, got {trpo_fisher!r}")
    cg_subsample = _check_unit(cg_subsample, "cg_subsample", low_open=True)
    if cg_subsample < 1 and trpo_fisher != "gauss_newton":
        raise ValueError(f"cg_subsample={cg_subsample} takes trpo_fisher='gauss_newton'")
    backtrack_ratio = _check_unit(backtrack_ratio, "backtrack_ratio", low_open=True, high_open=True)
    ppo_clip = check_positive_finite(PROMP_CLIP if ppo_clip is None and outer == "promp" else
                                     PPO_CLIP if ppo_clip is None else ppo_clip, "ppo_clip")
    inner_kl_penalty = _check_nonnegative_finite(inner_kl_penalty, "inner_kl_penalty")
    ppo_epochs = check_positive_int(ppo_epochs, "ppo_epochs")
    ppo_lr = check_positive_finite(ppo_lr, "ppo_lr")
    if outer == "promp" and estimator != "lvc":
        raise ValueError(f"outer='promp' is ProMP, whose estimator is 'lvc' (got {estimator!r}); for PPO-clip on "
                         "another estimator use outer='ppo'")
    if estimator == "emaml" and outer not in ("gradient", "trpo"):
        raise ValueError(f"estimator='emaml' takes outer 'gradient' or 'trpo' (E-MAML-TRPO, its paper's), got "
                         f"{outer!r}")
    if estimator == "emaml" and k == 0:
        raise ValueError("estimator='emaml' credits the pre-update samples with the post-update return: it needs "
                         "num_inner_steps >= 1")
    if outer == "promp" and policy.kl is None:
        raise ValueError("outer='promp' penalises the analytic KL of the inner steps: this policy has no "
                         "kl(old_params, new_params, obs) (Policy.kl)")
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
        PPO's epochs) works on: the inner batches with their advantages and sampling policies, the outer episodes
        with theirs, their
        log-probabilities under the old adapted policy and that policy, and the returns before and after
        adaptation."""
        def one(task):
            phi, batches, key_out, _ = inner_loop(params, task, alpha, k)
            traj = rollouts.rollout(env, policy, phi, task.params, key_out, n_out)
            old = jax.lax.stop_gradient(rollouts.log_probs(policy, phi, traj))
            ret_pre = jnp.mean(jnp.sum(batches[0][1].rewards, axis=1))
            olds = [jax.lax.stop_gradient(phi_j) for phi_j, _, _ in batches]
            return [(t, a) for _, t, a in batches], olds, (traj, adv(traj), old, jax.lax.stop_gradient(phi)), \
                ret_pre, jnp.mean(jnp.sum(traj.rewards, axis=1))

        return jax.vmap(one)(tasks)

    def readapt(p, inner, alpha, path=False, per_task=False):
        """Every task's φ(p), re-adapted from p on its inner batches sampled at θ_old (through ``inner_step``, so
        the estimator's curvature term is kept); a leading task axis. ``path``: also the policy before each
        inner step (p, φ_1(p), ...). ``per_task``: p has a task axis too, task i re-adapted from p[i]."""
        def one(p_i, inner_i):
            phi, seen = p_i, []
            for j, (t_j, a_j) in enumerate(inner_i):
                seen.append(phi)
                phi = inner_step(phi, t_j, _rate_at(alpha, j, k), a_j)
            return (phi, seen) if path else phi

        return jax.vmap(one, (0 if per_task else None, 0))(p, inner)

    def inner_kl(seen, olds, inner):
        """ProMP's trust region of the pre-update policies: the mean over inner steps j of the mean over tasks of
        the analytic KL between batch j's sampling policy and ``seen[j]`` on batch j's states."""
        def one(old_i, cur_i, t_i):
            kl = jax.vmap(jax.vmap(policy.kl, (None, None, 0)), (None, None, 0))(old_i, cur_i, t_i.obs) * t_i.mask
            return jnp.sum(kl) / jnp.maximum(jnp.sum(t_i.mask), 1.0)

        return jnp.mean(jnp.stack([jnp.mean(jax.vmap(one)(olds[j], seen[j], inner[j][0])) for j in range(k)]))

    def exploration(p, inner, weights):
        """E-MAML's exploration term at p: the mean over tasks of minus ``weights`` (each task's standardised
        post-update reward, a constant) times the mean log-likelihood of its first inner batch under p."""
        def one(t0, w):
            lp = rollouts.log_probs(policy, p, t0)
            return -w * jnp.sum(lp) / jnp.maximum(jnp.sum(t0.mask), 1.0)

        return jnp.mean(jax.vmap(one)(inner[0][0], weights))

    def at_adapted(phis, traj, old_lp, old_phi):
        """``log π_φ(a|s) - log π_{φ(θ_old)}(a|s)`` on every outer step and, where the policy has one, the
        analytic ``KL(π_{φ(θ_old)}(·|s) ‖ π_φ(·|s))`` (masked; else None), for every task's ``φ``."""
        def one(phi, traj_i, old_i):
            lp = rollouts.log_probs(policy, phi, traj_i)
            if policy.kl is None:
                return lp, None
            kl = jax.vmap(jax.vmap(policy.kl, (None, None, 0)), (None, None, 0))(old_i, phi, traj_i.obs)
            return lp, kl * traj_i.mask

        lp, kl = jax.vmap(one)(phis, traj, old_phi)
        return lp - old_lp, kl

    def standardised_rewards(traj):
        """E-MAML's weights: each task's mean post-update reward per valid step, standardised by the mean and
        standard deviation of every valid step's reward in the meta-batch (ProMP's ``adj_avg_rewards``)."""
        m, r = traj.mask, traj.rewards
        n = jnp.maximum(jnp.sum(m), 1.0)
        mean = jnp.sum(r * m) / n
        std = jnp.sqrt(jnp.sum(jnp.square(r - mean) * m) / n)
        per_task = jnp.sum(r * m, axis=(1, 2)) / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1.0)
        return jax.lax.stop_gradient((per_task - mean) / (std + 1e-8))

    def sampled_metrics(ret_pre, ret_post):
        return {"task_losses": -ret_post, "pre_adapt_loss": -jnp.mean(ret_pre), "return_pre": jnp.mean(ret_pre),
                "return_post": jnp.mean(ret_post)}

    def linearised_readapt(params, inner, alpha, n):
        """``(φ, v ↦ Jv, w ↦ Jᵀw)``: the re-adaptation of ``n`` tasks from θ = ``params`` and its Jacobian, linearised
        once (J stacks each task's J_i = dφ_i/dθ; Jᵀw = Σ_i J_iᵀ w_i)."""
        if k != 1:
            phis, jvp = jax.linearize(lambda p: readapt(p, inner, alpha), params)
            vjp = jax.linear_transpose(jvp, params)
            return phis, jvp, lambda w: vjp(w)[0]
        # one inner step φ_i = θ - α∇L_i(θ): each J_i = I - α∇²L_i is symmetric, so Jᵀw = Σ_i J_i w_i comes from the
        # same linearisation as Jv, of the re-adaptation from one copy of θ per task (no transposed program)
        copies = lambda v: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), v)  # noqa: E731
        phis, jvp_each = jax.linearize(lambda c: readapt(c, inner, alpha, per_task=True), copies(params))
        return phis, lambda v: jvp_each(copies(v)), lambda w: jax.tree.map(lambda x: jnp.sum(x, 0), jvp_each(w))

    def trpo_estimate(params, tasks, alpha):
        """The paper's TRPO outer step on a meta-batch (see ``outer``); returns (loss, θ_old - θ_new, metrics)."""
        inner, _, (traj, a_out, old_lp, old_phi), ret_pre, ret_post = sample(params, tasks, alpha)
        count = jnp.maximum(jnp.sum(traj.mask), 1.0)
        weights = standardised_rewards(traj) if estimator == "emaml" else None

        def loss_at(phis):
            log_r, kl = at_adapted(phis, traj, old_lp, old_phi)
            ratio = jnp.exp(log_r) * traj.mask
            return -jnp.mean(jnp.sum(ratio * a_out, axis=(1, 2)) / traj.rewards.shape[1]), jnp.sum(kl) / count

        def loss_and_kl(p):
            loss, kl = loss_at(readapt(p, inner, alpha))
            if weights is not None:
                loss = loss + exploration(p, inner, weights)
            return loss, kl

        n = traj.rewards.shape[0]
        m = max(1, round(cg_subsample * n))  # the tasks whose states make the Fisher (rllab's subsample_factor)
        if trpo_fisher == "hessian":
            # the analytic KL's Hessian at θ_old as forward over reverse of its gradient, linearised once
            (loss0, _), g = jax.value_and_grad(loss_and_kl, has_aux=True)(params)
            _, hvp = jax.linearize(jax.grad(lambda p: loss_and_kl(p)[1]), params)
        else:
            # the same Hessian in its Gauss-Newton form, exact at θ_old: there the KL's gradient in each task's φ
            # is zero, so d²KL/dθ² = Jᵀ H J with J = dφ/dθ (the re-adaptation's Jacobian) and H the KL's Hessian
            # in φ -- one order of differentiation less than the Hessian through the re-adaptation
            first = lambda tree: jax.tree.map(lambda x: x[:m], tree)  # noqa: E731
            phis, jvp_phi, vjp_phi = linearised_readapt(params, first(inner), alpha, m)
            if m == n:  # the gradient through the same linearisation: g = Jᵀ ∇_φ loss
                (loss0, _), g_phi = jax.value_and_grad(loss_at, has_aux=True)(phis)
                g = vjp_phi(g_phi)
                if weights is not None:
                    explore, g_explore = jax.value_and_grad(lambda p: exploration(p, inner, weights))(params)
                    loss0, g = loss0 + explore, jax.tree.map(jnp.add, g, g_explore)
            else:
                (loss0, _), g = jax.value_and_grad(loss_and_kl, has_aux=True)(params)
            count_m = jnp.maximum(jnp.sum(first(traj.mask)), 1.0)
            kl_m = lambda f: jnp.sum(at_adapted(f, first(traj), first(old_lp), first(old_phi))[1]) / count_m  # noqa: E731
            _, h_phi = jax.linearize(jax.grad(kl_m), phis)

            def hvp(v):
                return vjp_phi(h_phi(jvp_phi(v)))

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

        inner, olds, (traj, a_out, old_lp, old_phi), ret_pre, ret_post = sample(params, tasks, alpha)
        count = jnp.maximum(jnp.sum(traj.mask), 1.0)

        def clipped(p):
            phis, seen = readapt(p, inner, alpha, path=True)
            log_r, kl = at_adapted(phis, traj, old_lp, old_phi)
            ratio = jnp.exp(log_r)
            surrogate = jnp.minimum(ratio * a_out, jnp.clip(ratio, 1 - ppo_clip, 1 + ppo_clip) * a_out)
            kl = jnp.sum(-log_r * traj.mask) if kl is None else jnp.sum(kl)
            loss = -jnp.sum(surrogate * traj.mask) / count
            if outer == "promp":
                kl_in = inner_kl(seen, olds, inner)
                return loss + inner_kl_penalty * kl_in, (kl / count, kl_in)
            return loss, (kl / count, None)

        opt = optax.adam(ppo_lr)

        def epoch(_, carry):
            p, opt_state = carry
            g, _ = jax.grad(clipped, has_aux=True)(p)
            updates, opt_state = opt.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state

        new, _ = jax.lax.fori_loop(0, ppo_epochs, epoch, (params, opt.init(params)))
        _, (kl, kl_in) = clipped(new)
        step = jax.tree.map(lambda p, n: p - n, params, new)
        metrics = {**sampled_metrics(ret_pre, ret_post), "kl": kl}
        if kl_in is not None:
            metrics["inner_kl"] = kl_in
        return -jnp.mean(ret_post), step, metrics

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
        return outer, score, value, ret_post, ret_pre, (batches[0][1] if batches else None), traj

    def estimate(params, tasks, meta_step=None, *, inner_lr=inner_lr):
        if outer == "trpo":
            return trpo_estimate(params, tasks, inner_lr)
        if outer in ("ppo", "promp"):
            return ppo_estimate(params, tasks, inner_lr)

        def surrogate(p):
            outer, score, value, ret_post, ret_pre, first, traj = jax.vmap(per_task, (None, 0, None))(
                p, tasks, inner_lr)
            total = outer
            if estimator == "emaml":
                total = total + exploration(p, [(first, None)], standardised_rewards(traj))
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
    if outer == "promp":
        label = "ProMP (LVC, PPO-clip, inner KL penalty)"
    elif estimator == "emaml":
        label = f"E-MAML{'' if outer == 'gradient' else ' (' + outer.upper() + ')'}"
    return protocols.MetaLearner(init=lambda p: p, estimate=estimate, adapt=adapt, name=name, label=label,
                                 exact_gradient=False, hyper={"inner_lr": inner_lr},
                                 reduction="mean", returns_step=outer != "gradient")


def promp(env: Env, policy: Policy, **settings: Any) -> protocols.MetaLearner:
    """ProMP (Rothfuss et al., 2019, "ProMP: Proximal Meta-Policy Search"): ``maml_rl`` with its LVC estimator and
    its outer step -- PPO-clip at clip range 0.3 plus a fixed penalty 5e-4 on the inner steps' KL, 5 epochs of
    Adam at 1e-3 on the samples of each meta-step (``outer="promp"``; the settings of jonasrothfuss/ProMP's run
    scripts). ``settings`` go to ``maml_rl`` (its rates, episodes, ``ppo_clip``, ``inner_kl_penalty`` ...); train
    with ``trpo_optimiser()``.

        >>> import jax
        >>> from jmaml import rl
        >>> env = rl.envs.navigation2d(horizon=5)
        >>> learner = rl.promp(env, rl.policies.gaussian_mlp(2, 2, hidden=(8,)), inner_episodes=2, outer_episodes=2)
        >>> learner.label, learner.returns_step
        ('ProMP (LVC, PPO-clip, inner KL penalty)', True)
    """
    if settings.get("outer", "promp") != "promp" or settings.get("estimator", "lvc") != "lvc":
        raise ValueError("promp is LVC with ProMP's outer step; for others use maml_rl(estimator=..., outer=...)")
    return maml_rl(env, policy, **{**settings, "estimator": "lvc", "outer": "promp"})


def emaml(env: Env, policy: Policy, **settings: Any) -> protocols.MetaLearner:
    """E-MAML (Stadie et al., 2018, "Some Considerations on Learning to Explore via Meta-Reinforcement Learning")
    with TRPO, as ProMP's reference runs it: ``maml_rl(estimator="emaml", outer="trpo")`` -- the naive inner step
    and outer term plus the exploration term (see ``maml_rl``). ``settings`` go to ``maml_rl`` (``outer="gradient"``
    for E-MAML on Adam); train with ``trpo_optimiser()`` for TRPO.

        >>> from jmaml import rl
        >>> env = rl.envs.navigation2d(horizon=5)
        >>> rl.emaml(env, rl.policies.gaussian_mlp(2, 2, hidden=(8,)), inner_episodes=2, outer_episodes=2).label
        'E-MAML (TRPO)'
    """
    if settings.get("estimator", "emaml") != "emaml":
        raise ValueError("emaml is estimator 'emaml'; for others use maml_rl(estimator=...)")
    return maml_rl(env, policy, **{"outer": "trpo", **settings, "estimator": "emaml"})
