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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jmaml import protocols
from jmaml._checks import check_num_steps, check_positive_int
from jmaml.estimators import _tree_vdot, conjugate_gradient
from jmaml.rl import rollouts
from jmaml.rl.envs import Env
from jmaml.rl.policies import Policy

ESTIMATORS = ("dice", "lvc", "naive")
OUTERS = ("gradient", "trpo", "ppo")


def trpo_optimiser() -> Any:
    """The meta-optimiser of ``maml_rl(..., outer="trpo")`` (and ``"ppo"``), whose estimate is the step
    itself: SGD at rate 1."""
    import optax

    return optax.sgd(1.0)


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


def maml_rl(env: Env, policy: Policy, *, inner_lr: float = 0.1, num_inner_steps: int = 1, inner_episodes: int = 20,
            outer_episodes: int = 20, gamma: float = 0.99, gae_lambda: float = 1.0, baseline: str | None = "linear",
            normalize_advantages: bool = True, estimator: str = "lvc", first_order: bool = False,
            score_baseline: bool = True, outer: str = "gradient", max_kl: float = 0.01, cg_iters: int = 10,
            cg_damping: float = 1e-5, line_search_steps: int = 15, backtrack_ratio: float = 0.8,
            ppo_clip: float = 0.2, ppo_epochs: int = 5, ppo_lr: float = 1e-3) -> protocols.MetaLearner:
    """MAML with a policy-gradient inner loop, as a ``MetaLearner`` for ``jmaml.fit`` on
    ``task_distribution(env)``.

    Args:
      env, policy: the environment family and the policy (``check_policy`` says whether they fit).
      inner_lr: α of the inner REINFORCE step (a per-call hyperparameter, so sweeps vmap over it).
      num_inner_steps: inner policy-gradient steps, each on ``inner_episodes`` fresh episodes; 0 trains the
        policy itself on every task (multi-task policy gradient: the "pretrained" baseline).
      outer_episodes: episodes of the adapted policy per task for the meta-objective.
      gamma, gae_lambda, baseline, normalize_advantages: the advantages (``rollouts.advantages``) of
        both loops; the paper's: γ = 0.99, the linear feature baseline, λ = 1.
      estimator: ``"lvc"`` (ProMP's low-variance curvature estimator), ``"dice"`` (unbiased: the gradient of
        the expected adapted return with the whole term through the inner sampling distribution) or
        ``"naive"`` (without it).
      first_order: no gradient through the inner policy gradient.
      score_baseline: centre the sampling-distribution term on the other tasks' mean return (it stays
        unbiased; False: no baseline).
      outer: ``"gradient"``: ``estimate`` returns the meta-gradient for any optax optimiser (Adam ...).
        ``"trpo"``: the paper's outer step, all on the device -- the natural gradient by ``cg_iters`` steps
        of conjugate gradient on Fisher-vector products (the Hessian of the mean KL between the old and the
        new adapted policies over the outer episodes' states, a sample estimate, damped by ``cg_damping``),
        scaled to the trust region ``max_kl`` and backtracked (``backtrack_ratio``, at most
        ``line_search_steps`` times) until the importance-weighted surrogate improves within the region;
        ``estimate`` then returns the step itself (``θ_old - θ_new``) as its "gradient": train with
        ``optax.sgd(1.0)`` (``trpo_optimiser()``); ``kl`` among its metrics is the new adapted policies'
        sample KL from the old. Uses the ``estimator``'s inner surrogate ("dice" is not
        available: TRPO's surrogate has no score term).
        ``"ppo"``: PPO-clip (Schulman et al., 2017) as ProMP uses it for meta-RL -- ``ppo_epochs`` steps of
        Adam at ``ppo_lr`` (its state fresh at every meta-step) on the clipped surrogate
        ``min(r A, clip(r, 1 - ppo_clip, 1 + ppo_clip) A)``, r the ratio of the re-adapted policy to the
        sampling one on the outer episodes, all on the samples drawn at θ_old and inside one compiled step;
        like ``"trpo"``, ``estimate`` returns the step itself (train with ``trpo_optimiser()``), and ``kl``
        (the sample KL from the old adapted policy) is among its metrics. Takes "lvc" or "naive".

    Returns:
      A ``MetaLearner`` whose loss is minus the adapted policy's mean (undiscounted) return over the
      outer episodes; ``task_losses`` per task, ``pre_adapt_loss`` minus the un-adapted policy's return
      (the first inner batch's), and ``return_pre``/``return_post``. Its gradient is the surrogate's
      (``exact_gradient`` is False: an estimate).

    Raises:
      ValueError: a policy that does not fit, counts < 1, γ or λ outside [0, 1], an unknown estimator.
    """
    check_policy(env, policy)
    k = check_num_steps(num_inner_steps, "num_inner_steps")
    n_in = check_positive_int(inner_episodes, "inner_episodes")
    n_out = check_positive_int(outer_episodes, "outer_episodes")
    for value, name in ((gamma, "gamma"), (gae_lambda, "gae_lambda")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if outer not in OUTERS:
        raise ValueError(f"outer must be one of {OUTERS}, got {outer!r}")
    if outer != "gradient" and estimator == "dice":
        raise ValueError(f"outer={outer!r} takes estimator 'lvc' or 'naive' (the DiCE score term has no "
                         "importance-weighted surrogate)")
    if outer != "gradient" and k == 0:
        raise ValueError(f"outer={outer!r} needs num_inner_steps >= 1 here; train the pretrained policy with "
                         "outer='gradient'")
    if outer == "ppo":
        check_positive_int(ppo_epochs, "ppo_epochs")
        for value, name in ((ppo_clip, "ppo_clip"), (ppo_lr, "ppo_lr")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
    if baseline not in ("linear", None):
        raise ValueError(f"baseline must be 'linear' or None, got {baseline!r}")

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
        ``num_steps + 1`` keys split from the task's). Returns the adapted policy, each step's
        ``(policy, episodes, advantages)``, the last key (the outer episodes') and ``observe`` of each policy
        before a step."""
        keys = jax.random.split(task.key, num_steps + 1)
        phi, batches, seen = params, [], []
        for j in range(num_steps):
            if observe is not None:
                seen.append(observe(phi))
            traj = rollouts.rollout(env, policy, phi, task.params, keys[j], n_in)
            a = adv(traj)
            batches.append((phi, traj, a))
            phi = inner_step(phi, traj, alpha, a)
        return phi, batches, keys[num_steps], seen

    def sample(params, tasks, alpha):
        """Every task's episodes at θ_old, the data an outer step that reuses its samples (TRPO's line search,
        PPO's epochs) works on: the inner batches with their advantages, the outer episodes with theirs and
        their log-probabilities under the old adapted policy, and the returns before and after adaptation."""
        def one(task):
            phi, batches, key_out, _ = inner_loop(params, task, alpha, k)
            traj = rollouts.rollout(env, policy, phi, task.params, key_out, n_out)
            old = jax.lax.stop_gradient(rollouts.log_probs(policy, phi, traj))
            ret_pre = jnp.mean(jnp.sum(batches[0][1].rewards, axis=1))
            return [(t, a) for _, t, a in batches], (traj, adv(traj), old), ret_pre, \
                jnp.mean(jnp.sum(traj.rewards, axis=1))

        return jax.vmap(one)(tasks)

    def log_ratios(p, inner, traj, old_lp, alpha):
        """log π_{φ(p)}(a|s) - log π_{φ(θ_old)}(a|s) on every outer step, φ(p) re-adapted from p on the
        inner batches sampled at θ_old (through ``inner_step``, so the estimator's curvature term is kept)."""
        def one(inner_i, traj_i):
            phi = p
            for t_j, a_j in inner_i:
                phi = inner_step(phi, t_j, alpha, a_j)
            return rollouts.log_probs(policy, phi, traj_i)

        return jax.vmap(one)(inner, traj) - old_lp

    def sampled_metrics(ret_pre, ret_post):
        return {"task_losses": -ret_post, "pre_adapt_loss": -jnp.mean(ret_pre), "return_pre": jnp.mean(ret_pre),
                "return_post": jnp.mean(ret_post)}

    def trpo_estimate(params, tasks, alpha):
        """The paper's TRPO outer step on a meta-batch (see ``outer``); returns (loss, θ_old - θ_new, metrics)."""
        inner, (traj, a_out, old_lp), ret_pre, ret_post = sample(params, tasks, alpha)

        def loss_and_kl(p):
            log_r = log_ratios(p, inner, traj, old_lp, alpha)
            ratio = jnp.exp(log_r) * traj.mask
            loss = -jnp.mean(jnp.sum(ratio * a_out, axis=(1, 2)) / traj.rewards.shape[1])
            kl = jnp.sum(-log_r * traj.mask) / jnp.maximum(jnp.sum(traj.mask), 1.0)
            return loss, kl

        (loss0, _), g = jax.value_and_grad(loss_and_kl, has_aux=True)(params)
        kl_grad = jax.grad(lambda p: loss_and_kl(p)[1])

        def fisher(v):
            hv = jax.jvp(kl_grad, (params,), (v,))[1]
            return jax.tree.map(lambda h, vi: h + cg_damping * vi, hv, v)

        neg_g = jax.tree.map(jnp.negative, g)
        s, residual = conjugate_gradient(fisher, neg_g, cg_iters)
        shs = _tree_vdot(s, fisher(s))
        scale = jnp.sqrt(2 * max_kl / jnp.maximum(shs, 1e-12))
        full = jax.tree.map(lambda si: scale * si, s)

        def candidate(j):
            frac = backtrack_ratio ** j.astype(loss0.dtype)
            return jax.tree.map(lambda p, f: p + frac * f, params, full)

        def not_done(carry):
            j, ok = carry
            return (j < line_search_steps) & ~ok

        def try_step(carry):
            j, _ = carry
            loss, kl = loss_and_kl(candidate(j))
            ok = (loss < loss0) & (kl <= max_kl) & jnp.isfinite(loss)
            return jnp.where(ok, j, j + 1), ok

        j, ok = jax.lax.while_loop(not_done, try_step, (jnp.zeros((), jnp.int32), jnp.zeros((), bool)))
        new = jax.tree.map(lambda c, p: jnp.where(ok, c, p), candidate(j), params)
        step = jax.tree.map(lambda p, n: p - n, params, new)
        metrics = {**sampled_metrics(ret_pre, ret_post), "line_search_steps": jnp.where(ok, j + 1, 0),
                   "cg_residual": residual, "kl": loss_and_kl(new)[1]}
        return -jnp.mean(ret_post), step, metrics

    def ppo_estimate(params, tasks, alpha):
        """The PPO-clip outer step (see ``outer``); returns (loss, θ_old - θ_new, metrics)."""
        import optax

        inner, (traj, a_out, old_lp), ret_pre, ret_post = sample(params, tasks, alpha)
        count = jnp.maximum(jnp.sum(traj.mask), 1.0)

        def clipped(p):
            log_r = log_ratios(p, inner, traj, old_lp, alpha)
            ratio = jnp.exp(log_r)
            surrogate = jnp.minimum(ratio * a_out, jnp.clip(ratio, 1 - ppo_clip, 1 + ppo_clip) * a_out)
            return -jnp.sum(surrogate * traj.mask) / count, jnp.sum(-log_r * traj.mask) / count

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

    def per_task(params, task, alpha):
        phi, batches, key_out, _ = inner_loop(params, task, alpha, k)
        score = sum(jnp.sum(rollouts.log_probs(policy, phi_j, t)) for phi_j, t, _ in batches)  # Σ log p_{φ_j(θ)}(τ_j)
        traj = rollouts.rollout(env, policy, phi, task.params, key_out, n_out)
        outer = pg_loss(phi, traj, adv(traj))
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
        """``num_steps`` inner policy-gradient steps on one ``RLTask`` (each on ``inner_episodes`` episodes)."""
        phi, _, _, seen = inner_loop(params, task, inner_lr, num_steps, observe)
        if observe is None:
            return phi
        return phi, jax.tree.map(lambda *v: jnp.stack(v), *seen, observe(phi))

    name = ("maml_rl" if estimator == "lvc" else f"maml_rl_{estimator}") if k else "pretrained_rl"
    name += "" if outer == "gradient" else f"_{outer}"
    label = f"MAML-RL ({estimator}{'' if outer == 'gradient' else ', ' + outer.upper()})"
    return protocols.MetaLearner(init=lambda p: p, estimate=estimate, adapt=adapt, name=name, label=label,
                                 exact_gradient=False, hyper={"inner_lr": inner_lr},
                                 reduction="mean")
