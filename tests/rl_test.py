"""Meta-RL (jmaml.rl): the meta-gradient estimators against the exact meta-gradient of a bandit, enumerated
in float64; environments, policies and their checks; training through jmaml.fit."""

import dataclasses
import io
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import procs
import pytest

import jmaml
from jmaml import rl

ALPHA = 1.4
REWARDS = np.array([0.2, 0.9])
THETA = np.array([[0.3, -0.2], [-0.4, 0.5]])  # logits: a row per pull


def _bandit_advantages(episodes, rewards, horizon, gamma, baseline, normalize, reg=1e-5):
    """The inner step's advantages of a bandit batch, in NumPy from their definitions: γ-returns-to-go, minus
    rllab's linear feature baseline (ridge least squares on [one-hot t, its square, t/100, (t/100)^2,
    (t/100)^3, 1]) when asked, then normalised to mean 0 and standard deviation 1 over the batch's steps."""
    r = np.asarray(rewards)
    g = np.zeros((len(episodes), horizon))
    for i, s in enumerate(episodes):
        acc = 0.0
        for t in reversed(range(horizon)):
            acc = r[s[t]] + gamma * acc
            g[i, t] = acc
    adv = g.copy()
    if baseline:
        t = np.arange(horizon) / 100.0
        one = np.eye(horizon)
        f = np.concatenate([one, one ** 2, t[:, None], t[:, None] ** 2, t[:, None] ** 3, np.ones((horizon, 1))], 1)
        feats = np.tile(f, (len(episodes), 1))
        a = np.concatenate([feats, np.sqrt(reg) * np.eye(f.shape[1])])
        w = np.linalg.lstsq(a, np.concatenate([g.reshape(-1), np.zeros(f.shape[1])]), rcond=None)[0]
        adv = g - (feats @ w).reshape(g.shape)
    if normalize:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv


def _exact(theta, alpha, rewards, inner_episodes, horizon=2, naive=False, lvc=False, gamma=1.0, baseline=False,
           normalize=False):
    """E_τ[J_out(θ + α ĝ(θ, τ))] by enumerating every inner sample τ (inner_episodes episodes of `horizon`
    pulls), written without jmaml.rl: log-softmax of a table, the inner advantages by ``_bandit_advantages``,
    J_out the adapted policy's expected γ-discounted return. ``naive``: the inner samples' probabilities held
    constant (what the naive estimator's expectation differentiates); ``lvc``: also the inner gradient
    through each step's likelihood ratio (ProMP's LVC estimator's expectation)."""
    seqs = list(itertools.product(range(2), repeat=horizon))
    r = jnp.asarray(rewards)

    def logp(th, seq):
        return sum(jax.nn.log_softmax(th[t])[a] for t, a in enumerate(seq))

    def j_out(phi):
        return sum(jnp.exp(logp(phi, s)) * sum(gamma ** t * r[a] for t, a in enumerate(s)) for s in seqs)

    def inner_grad(th, episodes):
        adv = _bandit_advantages(episodes, rewards, horizon, gamma, baseline, normalize)

        def objective(p):
            total = 0.0
            for i, s in enumerate(episodes):
                for t in range(horizon):
                    lp = jax.nn.log_softmax(p[t])[s[t]]
                    weight = jnp.exp(lp - jax.lax.stop_gradient(lp)) if lvc else lp
                    total = total + weight * adv[i, t]
            return total / (len(episodes) * horizon)  # a mean over the episodes' steps
        return jax.grad(objective)(th)

    def value(th):
        total = 0.0
        for episodes in itertools.product(seqs, repeat=inner_episodes):
            p = jnp.exp(sum(logp(th, s) for s in episodes))
            p = jax.lax.stop_gradient(p) if naive or lvc else p
            total = total + p * j_out(th + alpha * inner_grad(th, episodes))
        return total

    return value


def _mc(estimator, num_tasks=80_000, groups=80, inner_episodes=2, settings=None):
    """The estimator's Monte-Carlo mean and standard error on the bandit; ``settings``: maml_rl's keywords
    (None: γ = 1, no baseline, no normalisation; {}: maml_rl's own defaults)."""
    env = rl.envs.bandit(2, 2)
    policy = rl.policies.tabular_softmax(2, 2)
    if settings is None:
        settings = {"gamma": 1.0, "baseline": None, "normalize_advantages": False}
    learner = rl.maml_rl(env, policy, inner_lr=ALPHA, inner_episodes=inner_episodes, outer_episodes=1,
                         estimator=estimator, **settings)
    per = num_tasks // groups
    keys = jax.random.split(jax.random.key(7), num_tasks).reshape(groups, per)
    tasks = rl.RLTask(jnp.broadcast_to(jnp.asarray(REWARDS), (groups, per, 2)), keys)
    grads = jax.jit(jax.vmap(lambda t: learner.estimate(jnp.asarray(THETA), t)[1]))(tasks)
    grads = -np.asarray(grads)  # the learner minimises minus the return
    return grads.mean(0), grads.std(0, ddof=1) / np.sqrt(groups)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    {},  # maml_rl's defaults: γ = 0.99, the linear baseline, normalised inner advantages
    {"gamma": 0.5, "baseline": "linear", "normalize_advantages": False},
    {"gamma": 0.5, "baseline": None, "normalize_advantages": True},
], ids=["defaults", "gamma-baseline", "gamma-normalised"])
def test_dice_is_unbiased_with_the_settings_it_accepts(x64, settings):
    """DiCE's Monte-Carlo mean against the exact gradient of E_τ[J_γ(φ(θ, τ))], φ the inner rule with the
    same γ, baseline and normalisation: within 4 standard errors in every component."""
    gamma = settings.get("gamma", 0.99)
    baseline = settings.get("baseline", "linear") == "linear"
    normalize = settings.get("normalize_advantages", True)
    theta = jnp.asarray(THETA)
    exact = np.asarray(jax.grad(_exact(theta, ALPHA, REWARDS, 2, gamma=gamma, baseline=baseline,
                                       normalize=normalize))(theta))
    dice, se = _mc("dice", settings=settings)
    assert np.all(np.abs(dice - exact) < 4 * se), (dice, exact, se)


def test_the_dice_estimator_matches_the_exact_meta_gradient_and_the_naive_one_is_biased(x64):
    exact = np.asarray(jax.grad(_exact(jnp.asarray(THETA), ALPHA, REWARDS, 2))(jnp.asarray(THETA)))
    naive_expected = np.asarray(jax.grad(_exact(jnp.asarray(THETA), ALPHA, REWARDS, 2, naive=True))(
        jnp.asarray(THETA)))
    dice, dice_se = _mc("dice")
    naive, naive_se = _mc("naive")
    # DiCE: unbiased, every component within 4 standard errors of the exact meta-gradient
    assert np.all(np.abs(dice - exact) < 4 * dice_se), (dice, exact, dice_se)
    # naive: unbiased for the wrong quantity -- the gradient with the inner samples' probabilities held fixed
    assert np.all(np.abs(naive - naive_expected) < 4 * naive_se), (naive, naive_expected, naive_se)
    # and that quantity differs from the exact gradient where theory says: the term through p_θ(τ)
    bias = naive_expected - exact
    assert np.max(np.abs(bias)) > 0.05
    assert np.max(np.abs(naive - exact) / naive_se) > 8, (naive, exact, naive_se)


def _exact_two_steps(alpha, horizon=2):
    """E over τ1 ~ π_θ, τ2 ~ π_φ1 of J(φ2), φ1 = θ + α ĝ(θ, τ1), φ2 = φ1 + α ĝ(φ1, τ2): two inner steps of one
    episode each (γ = 1, no baseline), every pair of inner samples enumerated, written without jmaml.rl."""
    seqs = list(itertools.product(range(2), repeat=horizon))
    r = jnp.asarray(REWARDS)

    def logp(th, seq):
        return sum(jax.nn.log_softmax(th[t])[a] for t, a in enumerate(seq))

    def j_out(phi):
        return sum(jnp.exp(logp(phi, s)) * sum(r[a] for a in s) for s in seqs)

    def inner_grad(th, seq):
        adv = _bandit_advantages([seq], REWARDS, horizon, 1.0, False, False)
        return jax.grad(lambda p: sum(jax.nn.log_softmax(p[t])[seq[t]] * adv[0, t] for t in range(horizon))
                        / horizon)(th)

    def value(th):
        total = 0.0
        for s1 in seqs:
            phi1 = th + alpha * inner_grad(th, s1)
            for s2 in seqs:
                total = total + jnp.exp(logp(th, s1) + logp(phi1, s2)) * j_out(phi1 + alpha * inner_grad(phi1, s2))
        return total

    return value


@pytest.mark.slow
def test_dice_is_the_exact_meta_gradient_through_two_inner_steps(x64):
    """k = 2: DiCE's score term sums every inner batch's log-probability under the policy that drew it (the
    second batch's policy depends on θ through the first step), so its Monte-Carlo mean is the exact
    gradient of the two-step objective, within 4 standard errors; the naive estimator misses those terms."""
    alpha = 0.7
    exact = np.asarray(jax.jit(jax.grad(_exact_two_steps(alpha)))(jnp.asarray(THETA)))
    env, policy = rl.envs.bandit(2, 2), rl.policies.tabular_softmax(2, 2)
    groups, per = 80, 1000
    keys = jax.random.split(jax.random.key(7), groups * per).reshape(groups, per)
    tasks = rl.RLTask(jnp.broadcast_to(jnp.asarray(REWARDS), (groups, per, 2)), keys)
    z = {}
    for estimator in ("dice", "naive"):
        learner = rl.maml_rl(env, policy, inner_lr=alpha, inner_episodes=1, outer_episodes=1, num_inner_steps=2,
                             estimator=estimator, gamma=1.0, baseline=None, normalize_advantages=False)
        g = -np.asarray(jax.jit(jax.vmap(lambda t, lr=learner: lr.estimate(jnp.asarray(THETA), t)[1]))(tasks))
        z[estimator] = (g.mean(0) - exact) / (g.std(0, ddof=1) / np.sqrt(groups))
    assert np.all(np.abs(z["dice"]) < 4), z
    assert np.max(np.abs(z["naive"])) > 8, z


def test_the_lvc_estimator_has_the_expectation_promp_gives_it(x64):
    """LVC: the inner step through per-step likelihood ratios, inner samples' probabilities held fixed."""
    lvc_expected = np.asarray(jax.grad(_exact(jnp.asarray(THETA), ALPHA, REWARDS, 2, lvc=True))(jnp.asarray(THETA)))
    naive_expected = np.asarray(jax.grad(_exact(jnp.asarray(THETA), ALPHA, REWARDS, 2, naive=True))(
        jnp.asarray(THETA)))
    lvc, se = _mc("lvc")
    assert np.all(np.abs(lvc - lvc_expected) < 4 * se), (lvc, lvc_expected, se)
    assert np.max(np.abs(lvc_expected - naive_expected)) > 0.01  # the curvature term it adds


def test_the_exact_objective_is_the_adapted_return(x64):
    """α = 0: the expected adapted return is the policy's own return, Σ_t Σ_a π(a|t) r_a."""
    value = _exact(jnp.asarray(THETA), 0.0, REWARDS, 1)(jnp.asarray(THETA))
    pi = np.exp(THETA) / np.exp(THETA).sum(1, keepdims=True)
    assert float(value) == pytest.approx(float((pi @ REWARDS).sum()), rel=1e-12)


def test_rollouts_follow_the_environment():
    env = rl.envs.navigation2d(horizon=5)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(8,))
    params = policy.init(jax.random.key(0))
    goal = jnp.asarray([0.3, -0.2])
    traj = rl.rollouts.rollout(env, policy, params, goal, jax.random.key(1), 3)
    assert traj.obs.shape == (3, 5, 2) and traj.actions.shape == (3, 5, 2) and traj.rewards.shape == (3, 5)
    pos = np.cumsum(np.clip(np.asarray(traj.actions), -0.1, 0.1), axis=1)
    np.testing.assert_allclose(traj.rewards, -np.linalg.norm(pos - np.asarray(goal), axis=-1), rtol=1e-5)
    np.testing.assert_allclose(traj.obs[:, 1:], pos[:, :-1], rtol=1e-5, atol=1e-7)
    g = rl.rollouts.returns_to_go(jnp.asarray([[1.0, 2.0, 3.0]]), 0.5)
    np.testing.assert_allclose(g, [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3]])


def test_a_policy_that_does_not_fit_the_environment_is_named():
    with pytest.raises(ValueError, match=r"the policy's actions do not fit environment 'navigation2d'.*shape \(3,\)"):
        rl.maml_rl(rl.envs.navigation2d(), rl.policies.gaussian_mlp(2, 3))
    with pytest.raises(ValueError, match=r"the policy takes continuous actions .* the environment 2 discrete"):
        rl.maml_rl(rl.envs.bandit(2, 2), rl.policies.gaussian_mlp(2, 2))
    with pytest.raises(ValueError, match=r"observations of shape \(3,\), environment 'navigation2d' gives \(2,\)"):
        rl.maml_rl(rl.envs.navigation2d(), rl.policies.gaussian_mlp(3, 2))
    with pytest.raises(ValueError, match="horizon must be"):
        rl.envs.navigation2d(horizon=0)
    with pytest.raises(ValueError, match="estimator must be one of"):
        rl.maml_rl(rl.envs.navigation2d(), rl.policies.gaussian_mlp(2, 2), estimator="dive")


def test_navigation_trains_through_fit_and_resumes_bitwise(tmp_path):
    env = rl.envs.navigation2d(horizon=20)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(16, 16))
    learner = rl.maml_rl(env, policy, inner_lr=0.1, inner_episodes=5, outer_episodes=5)
    dist = rl.task_distribution(env)
    params = policy.init(jax.random.key(0))
    common = dict(steps=6, meta_batch_size=4, log=jmaml.Logging(every=2, progress=False, stream=io.StringIO()))
    whole = jmaml.fit(learner, dist, optax.adam(1e-2), params, run=str(tmp_path / "a"), **common)
    with pytest.raises(jmaml.Interrupted):
        jmaml.fit(learner, dist, optax.adam(1e-2), params, run=str(tmp_path / "b"), stop_at_step=2, **common)
    resumed = jmaml.fit(learner, dist, optax.adam(1e-2), params, run=jmaml.RunDir(str(tmp_path / "b"), resume=True),
                        **common)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"return_post"' in lines[-1]


def test_a_sweep_over_the_inner_rate_and_seed_of_an_rl_learner_is_one_program():
    env = rl.envs.navigation2d(horizon=10)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(8,))
    learner = rl.maml_rl(env, policy, inner_lr=0.1, inner_episodes=3, outer_episodes=3)
    points = {"inner_lr": [0.05, 0.2, 0.05, 0.2], "seed": [0, 0, 1, 1]}
    pop = jmaml.fit_population(learner, rl.task_distribution(env), optax.adam(1e-2), policy.init, points, steps=4,
                               meta_batch_size=4, log=jmaml.Logging(every=2, progress=False, stream=io.StringIO()))
    assert pop.alive.tolist() == [True] * 4 and int(pop.step) == 4
    # each point equals its own run with fit (the population's points share its task stream, key 0)
    alone = jmaml.fit(rl.maml_rl(env, policy, inner_lr=0.2, inner_episodes=3, outer_episodes=3),
                      rl.task_distribution(env), optax.adam(1e-2), policy.init(jax.random.key(1)), steps=4,
                      meta_batch_size=4, key=0, log=jmaml.Logging(every=2, progress=False, stream=io.StringIO()))
    got = jax.tree.map(lambda a: a[3], pop.points.params)
    for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_a_non_finite_reward_stops_the_run_naming_it(tmp_path):
    base = rl.envs.navigation2d(horizon=5)

    def step(key, state, action, goal):
        obs, state, reward, done = base.step(key, state, action, goal)
        return obs, state, jnp.where(goal[0] > 0, jnp.nan, reward), done

    env = base._replace(step=step)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(8,))
    learner = rl.maml_rl(env, policy, inner_episodes=2, outer_episodes=2)
    # named: the tasks whose returns are not finite, and the return metrics that carry the reward
    with pytest.raises(jmaml.DivergenceError, match=r"non-finite .*tasks \[.*\] of the meta-batch; the learner's "
                                                    r"metrics non-finite there: return_post, return_pre"):
        jmaml.fit(learner, rl.task_distribution(env), optax.adam(1e-2), policy.init(jax.random.key(0)), steps=2,
                  meta_batch_size=4, log=jmaml.Logging(every=1, progress=False, stream=io.StringIO()))


def test_the_linear_baseline_is_least_squares_even_with_collinear_features(x64):
    """Pendulum observations make cos^2 + sin^2 = 1 the constant feature: a least-squares fit (NumPy's, on
    the same features) and no NaN."""
    env = rl.envs.pendulum(horizon=12)
    policy = rl.policies.gaussian_mlp(3, 1, hidden=(8,))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), policy.init(jax.random.key(0)))
    task = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), env.sample_task(jax.random.key(1)))
    traj = rl.rollouts.rollout(env, policy, params, task, jax.random.key(2), 5)
    returns = rl.rollouts.returns_to_go(traj.rewards, 0.99)
    obs = np.clip(np.asarray(traj.obs), -10, 10)
    t = np.broadcast_to(np.arange(12)[None, :, None] / 100.0, (5, 12, 1))
    feats = np.concatenate([obs, obs ** 2, t, t ** 2, t ** 3, np.ones_like(t)], -1).reshape(-1, 10)
    assert np.linalg.matrix_rank(feats) < 10  # collinear: the normal equations alone are singular
    w = np.linalg.lstsq(feats, np.asarray(returns).reshape(-1), rcond=None)[0]
    for solver in rl.rollouts.BASELINE_SOLVERS:
        got = np.asarray(rl.rollouts.linear_baseline(traj, returns, reg=0.0, solver=solver))
        np.testing.assert_allclose(got.reshape(-1), feats @ w, rtol=1e-8, atol=1e-8, err_msg=solver)
        assert np.isfinite(got).all()


@pytest.mark.parametrize("env_name", ["navigation2d", "pendulum"])
def test_the_cholesky_baseline_in_float32_is_float64s_ridge_fit(env_name):
    """The default solver (regularised normal equations by Cholesky, refined) in float32, on the paper's episode
    sizes, against the same ridge problem solved in float64 by NumPy's SVD least squares: predictions within
    1e-5 of the returns' scale (pendulum's features are collinear), and no less accurate than the float32 SVD."""
    env = rl.envs.ENVS[env_name](horizon=100)
    policy = rl.policies.gaussian_mlp(env.observation_shape[0], env.action_shape[0], hidden=(32,))
    task = env.sample_task(jax.random.key(1))
    traj = rl.rollouts.rollout(env, policy, policy.init(jax.random.key(0)), task, jax.random.key(2), 20)
    returns = rl.rollouts.returns_to_go(traj.rewards, 0.99)
    reg = 1e-5
    f = np.asarray(rl.rollouts._features(traj) * traj.mask[..., None], np.float64).reshape(-1, env.observation_shape[0]
                                                                                          * 2 + 4)
    y = np.asarray(returns * traj.mask, np.float64).reshape(-1)
    w64 = np.linalg.lstsq(np.concatenate([f, np.sqrt(reg) * np.eye(f.shape[1])]),
                          np.concatenate([y, np.zeros(f.shape[1])]), rcond=None)[0]
    scale = np.abs(y).max()
    errors = {}
    for solver in rl.rollouts.BASELINE_SOLVERS:
        got = np.asarray(jax.jit(rl.rollouts.linear_baseline, static_argnames="solver")(traj, returns, reg,
                                                                                          solver=solver))
        assert got.dtype == np.float32 and np.isfinite(got).all()
        errors[solver] = np.abs(got.reshape(-1) - (f @ w64) * np.asarray(traj.mask).reshape(-1)).max() / scale
    assert errors["cholesky"] < 1e-5, errors
    assert errors["cholesky"] <= 2 * errors["lstsq"], errors


def test_the_baseline_of_episodes_that_all_ended_is_zero():
    """No live step: the features are all zero; the fit is w = 0 (no NaN), with or without a ridge."""
    env = rl.envs.navigation2d(horizon=6)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(4,))
    traj = rl.rollouts.rollout(env, policy, policy.init(jax.random.key(0)), env.sample_task(jax.random.key(1)),
                               jax.random.key(2), 3)
    dead = traj._replace(mask=jnp.zeros_like(traj.mask))
    returns = rl.rollouts.returns_to_go(traj.rewards, 0.99)
    for reg in (1e-5, 0.0):
        w = np.asarray(rl.rollouts.fit_linear_baseline(dead, returns, reg))
        np.testing.assert_array_equal(w, 0.0)
    with pytest.raises(ValueError, match=r"solver must be one of \('cholesky', 'lstsq'\), got 'qr'"):
        rl.rollouts.fit_linear_baseline(traj, returns, solver="qr")


def test_trpo_takes_a_step_inside_its_trust_region():
    """outer='trpo': the step is the natural gradient scaled to the trust region and backtracked; here the
    line search accepts a step and the estimate's KL of the new adapted policies stays within max_kl."""
    env = rl.envs.navigation2d(horizon=10)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(8,))
    learner = rl.maml_rl(env, policy, inner_episodes=4, outer_episodes=4, outer="trpo", max_kl=0.01)
    assert learner.name == "maml_rl_trpo"
    params = policy.init(jax.random.key(0))
    tasks = rl.task_distribution(env).sample(jax.random.key(1), 4)
    loss, step, metrics = jax.jit(learner.estimate)(params, tasks)
    assert int(metrics["line_search_steps"]) >= 1 and 0 < float(metrics["kl"]) <= 0.01
    assert float(optax.global_norm(step)) > 0
    state = jmaml.fit(learner, rl.task_distribution(env), rl.trpo_optimiser(), params, steps=2, meta_batch_size=4,
                      log=jmaml.Logging(every=1, progress=False, stream=io.StringIO()))
    assert int(state.step) == 2
    with pytest.raises(ValueError, match="outer='trpo' takes estimator 'lvc' or 'naive'"):
        rl.maml_rl(env, policy, outer="trpo", estimator="dice")


def _rl_cli(out, *extra):
    import sys

    env, root = procs.clean_env(), procs.ROOT
    cmd = [sys.executable, "-m", "jmaml", "rl", "--out", str(out), "--steps", "30", "--log-every", "2",
           "--episodes", "3", "--horizon", "8", "--hidden", "8", "--meta-batch-size", "4", "--no-pretrain",
           "--outer", "trpo", "--eval-tasks", "4", "--eval-episodes", "3", "--validation-tasks", "3", *extra]
    return cmd, env, root


@pytest.mark.slow
def test_an_rl_run_killed_by_sigkill_resumes_bitwise(tmp_path):
    """``jmaml rl --out DIR --resume`` with no other flag finishes the recorded run (rl_config.json), bitwise
    equal to an uninterrupted one -- its checkpoint and its best-on-validation policy; a flag that contradicts
    the record is refused by name; ``jmaml rl eval`` re-scores the run under another protocol."""
    import json
    import signal
    import subprocess
    import sys

    from jmaml.engine import checkpoint

    cmd, env, root = _rl_cli(tmp_path / "straight", "--no-eval")
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cmd, env, root = _rl_cli(tmp_path / "killed", "--no-eval")
    ckpt = tmp_path / "killed" / "maml_rl_trpo.ckpt.npz"
    code = procs.kill_at_checkpoint(cmd, ckpt, before_step=30, env=env)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    jmaml_rl = [sys.executable, "-m", "jmaml", "rl", "--out", str(tmp_path / "killed")]
    refused = subprocess.run(jmaml_rl + ["--resume", "--horizon", "9", "--no-eval"], env=env, cwd=root,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--horizon 9 (recorded 8)" in refused.stderr, refused.stderr[-2000:]
    resumed = subprocess.run(jmaml_rl + ["--resume", "--no-eval"], env=env, cwd=root, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("maml_rl_trpo.ckpt.npz", "maml_best.npz"):
        a = checkpoint.arrays(tmp_path / "straight" / name)
        b = checkpoint.arrays(tmp_path / "killed" / name)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    assert checkpoint.read_header(ckpt)["step"] == 30
    best = [checkpoint.read_header(tmp_path / run / "maml_best.npz") for run in ("straight", "killed")]
    assert best[0]["extra"] == best[1]["extra"] and len(best[0]["extra"]["scores"]) == 15
    # evaluation: eval.json and the table, then the same run re-scored at other test-time rates
    out = subprocess.run(jmaml_rl + ["--resume"], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "| maml |" in out.stdout and "| maml_best |" in out.stdout, out.stderr[-2000:]
    recorded = json.loads((tmp_path / "killed" / "eval.json").read_text())
    assert recorded["results"]["maml"]["test_lr"] == pytest.approx([0.1, 0.05, 0.05])
    again = subprocess.run([sys.executable, "-m", "jmaml", "rl", "eval", str(tmp_path / "killed"), "--eval-lr",
                            "0.2", "--name", "constant"], env=env, cwd=root, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "| random |" in again.stdout, again.stderr[-2000:]
    other = json.loads((tmp_path / "killed" / "constant.json").read_text())
    assert other["results"]["maml"]["test_lr"] == pytest.approx([0.2, 0.2, 0.2])
    assert other["results"]["maml"]["mean"][0] == recorded["results"]["maml"]["mean"][0]  # same tasks, no step
    assert other["results"]["maml"]["mean"][1] != recorded["results"]["maml"]["mean"][1]


@pytest.mark.parametrize("flags, message", [
    (("--horizon", "0"), "horizon must be"),
    (("--inner-lr", "nan"), "inner_lr must be a finite number > 0"),
    (("--inner-lr", "inf"), "inner_lr must be a finite number > 0"),
    (("--inner-lr", "1e400"), "inner_lr must be a finite number > 0"),
    (("--inner-lr", "-1"), "inner_lr must be a finite number > 0"),
    (("--meta-lr", "0"), "meta_lr must be a finite number > 0"),
    (("--gamma", "1.5"), "gamma must be a number in (0, 1]"),
    (("--eval-lr", "0.1,-0.05"), "eval_lr must be a finite number > 0"),
    (("--goal-tolerance", "-0.01"), "goal_tolerance must be"),
    (("--env", "pendulum", "--goal-tolerance", "0.01"), "goal_tolerance is navigation2d's"),
    (("--eval-tasks", "1"), "eval_tasks and validation_tasks must be >= 2"),
])
def test_the_rl_command_names_bad_settings(tmp_path, flags, message):
    import subprocess

    cmd, env, root = _rl_cli(tmp_path / "x", *flags)
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-1000:]
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_the_rl_command_leaves_another_kind_of_run_alone(tmp_path):
    import subprocess

    run = tmp_path / "trained"
    run.mkdir()
    (run / "config.json").write_text('{"config": {}, "versions": {}}')
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    for flag in ("--overwrite", "--resume"):
        cmd, env, root = _rl_cli(run, flag)
        out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "holds another kind of run" in out.stderr, out.stderr[-1000:]
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == '{"step": 5}\n'


def _small_rl_config(**kw):
    settings = dict(horizon=8, steps=6, meta_batch_size=4, inner_episodes=3, outer_episodes=3, hidden=(8,),
                    log_every=2, eval_tasks=4, eval_episodes=3, validation_tasks=3, pretrain=False)
    return rl.recipe.RLConfig(**{**settings, **kw}).validate()


def test_the_best_policy_on_validation_is_the_run_at_that_step(tmp_path):
    """maml_best is MAML's parameters at the meta-step whose validation return after one step was highest:
    equal to a run of that many steps (chunks align, so its step-k state is the longer run's), and its score
    is the one recorded for that step."""
    config = _small_rl_config()
    trained = rl.recipe.train(config, str(tmp_path / "long"), progress=False)
    best = trained["_best"]
    scores = {int(k): v for k, v in best["scores"].items()}
    assert sorted(scores) == [2, 4, 6]
    assert best["step"] == max(scores, key=scores.get) and best["validation_return"] == max(scores.values())
    short = rl.recipe.train(dataclasses.replace(config, steps=best["step"]), str(tmp_path / "short"), progress=False)
    for a, b in zip(jax.tree.leaves(trained["maml_best"]), jax.tree.leaves(short["maml"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded = rl.recipe.load_trained(config, str(tmp_path / "long"))
    for a, b in zip(jax.tree.leaves(loaded["maml_best"]), jax.tree.leaves(trained["maml_best"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_resumed_rl_run_is_lengthened_as_jmaml_train_is_and_never_shortened(tmp_path):
    """``resume`` with more steps continues the recorded run (jmaml train's rule): 4 steps then resumed to 6 is a
    6-step run, bitwise, and records 6; asking for fewer steps than a checkpoint holds is refused by name, and so
    is another setting."""
    config = _small_rl_config(steps=6)
    straight = rl.recipe.train(config, str(tmp_path / "straight"), progress=False)
    run = str(tmp_path / "run")
    rl.recipe.train(dataclasses.replace(config, steps=4), run, progress=False)
    longer = rl.recipe.train(config, run, resume=True, progress=False)
    for name in ("maml", "maml_best"):
        for a, b in zip(jax.tree.leaves(straight[name]), jax.tree.leaves(longer[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert rl.recipe.load_config(run).steps == 6
    with pytest.raises(ValueError, match=r"--resume --steps 2: .* holds checkpoints at steps .*cannot be shortened"):
        rl.recipe.train(dataclasses.replace(config, steps=2), run, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"settings differ: horizon"):
        rl.recipe.train(dataclasses.replace(config, horizon=9), run, resume=True, progress=False)
    assert rl.recipe.load_config(run) == config


def test_the_evaluation_schedule_reaches_adapt():
    """The test-time schedule α, α/2 (the paper's) reaches the learner's adapt: recipe's batched program gives
    what ``evaluation.returns_after_steps`` gives with that schedule, and a constant rate gives another curve
    after step 1 (the same before it)."""
    config = _small_rl_config(eval_steps=2)
    assert config.eval_schedule() == (0.1, 0.05)
    assert dataclasses.replace(config, eval_lr=(0.3,)).eval_schedule() == (0.3, 0.3)
    env, policy, maml, _ = config.parts()
    params = policy.init(jax.random.key(0))
    program = rl.recipe.returns_program(maml, env, policy, config.eval_episodes)
    both = program(params, [[0.1, 0.05], [0.1, 0.1]], 7, 4)
    direct = rl.evaluation.returns_after_steps(maml, env, policy, params, key=7, num_tasks=4, num_steps=2,
                                               eval_episodes=config.eval_episodes,
                                               inner_lr=jnp.asarray([0.1, 0.05]))
    np.testing.assert_allclose(both[0], direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(both[0][:, :2], both[1][:, :2])
    assert not np.allclose(both[0][:, 2], both[1][:, 2])


def test_the_baselines_rate_is_the_best_on_validation():
    config = _small_rl_config(eval_steps=2, baseline_lrs=(0.01, 0.3, 3.0))
    env, policy, maml, _ = config.parts()
    params = policy.init(jax.random.key(0))
    program = rl.recipe.returns_program(maml, env, policy, config.eval_episodes)
    tuned = rl.recipe.tune_baseline_rate(config, program, params)
    scores = tuned["validation_scores"]
    chosen = max(scores, key=scores.get)
    assert tuned["schedule"] == pytest.approx([float(chosen), float(chosen) / 2])
    curves = program(params, [[0.3, 0.15]], rl.recipe.VALIDATION_KEY + config.seed, config.validation_tasks)
    assert scores["0.3"] == pytest.approx(float(curves[0, :, 1:].mean()), rel=1e-6)


def test_navigation_with_normalized_actions_moves_in_units_of_the_box():
    """cbfinn/maml_rl's environment under rllab's normalize: action a moves clip(0.1 a, ±0.1)."""
    raw, unit = rl.envs.navigation2d(), rl.envs.navigation2d(normalized_actions=True)
    goal, key = jnp.asarray([0.3, -0.2]), jax.random.key(0)
    for action, move in (([0.5, -2.0], [0.05, -0.1]), ([0.05, 0.0], [0.005, 0.0])):
        pos, _ = unit.reset(key, goal)
        np.testing.assert_allclose(unit.step(key, pos, jnp.asarray(action), goal)[0], move, rtol=1e-6)
    np.testing.assert_allclose(raw.step(key, jnp.zeros(2), jnp.asarray([0.05, -2.0]), goal)[0], [0.05, -0.1])
    with pytest.raises(TypeError, match="normalized_actions must be True or False"):
        rl.envs.navigation2d(normalized_actions=1)


def test_navigation_ends_at_the_goal_in_the_paper_setting():
    assert rl.recipe.RLConfig().env_settings() == {"horizon": 100, "goal_tolerance": 0.01,
                                                   "normalized_actions": True}
    assert rl.recipe.RLConfig(goal_tolerance=0.0, normalized_actions=False).env_settings() == {
        "horizon": 100, "goal_tolerance": None, "normalized_actions": False}
    assert rl.recipe.RLConfig(env="pendulum").env_settings() == {"horizon": 100}
    with pytest.raises(ValueError, match="normalized_actions is navigation2d's"):
        rl.recipe.RLConfig(env="pendulum", normalized_actions=True).validate()
    with pytest.raises(ValueError, match="rl_config.json has settings jmaml rl does not know: \\['nope'\\]"):
        rl.recipe.RLConfig.from_json({"nope": 1})
    assert rl.recipe.RLConfig.from_json({"hidden": [8, 8], "eval_lr": [0.2]}).hidden == (8, 8)


def test_gae_against_its_definition(x64):
    """GAE(λ): Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V(s_{t+1}) − V(s_t), V the linear baseline (0 after the end);
    λ = 1 is the returns-to-go minus the baseline."""
    env = rl.envs.navigation2d(horizon=6)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(8,))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), policy.init(jax.random.key(0)))
    traj = rl.rollouts.rollout(env, policy, params, jnp.asarray([0.2, -0.3]), jax.random.key(1), 4)
    gamma, lam = 0.9, 0.7
    values = np.asarray(rl.rollouts.linear_baseline(traj, rl.rollouts.returns_to_go(traj.rewards, gamma)))
    r = np.asarray(traj.rewards)
    nxt = np.concatenate([values[:, 1:], np.zeros((4, 1))], axis=1)
    delta = r + gamma * nxt - values
    expected = np.zeros_like(r)
    for t in range(6):
        expected[:, t] = sum((gamma * lam) ** i * delta[:, t + i] for i in range(6 - t))
    got = rl.rollouts.advantages(traj, gamma, gae_lambda=lam)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    one = rl.rollouts.advantages(traj, gamma, gae_lambda=1.0)
    np.testing.assert_allclose(one, np.asarray(rl.rollouts.returns_to_go(traj.rewards, gamma)) - values, atol=1e-12)


def test_ppo_first_epoch_is_adams_first_step_on_the_meta_gradient(x64):
    """outer='ppo' with one epoch: at θ_old every ratio is 1, the clip is inactive, and the clipped surrogate's
    gradient is the MAML-RL meta-gradient (outer='gradient', the same samples) over the horizon; the step is
    then Adam's first update of it -- computed here from the gradient learner's estimate and Adam's formula."""
    env = rl.envs.navigation2d(horizon=6)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(5,))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), policy.init(jax.random.key(0)))
    tasks = rl.task_distribution(env).sample(jax.random.key(1), 3)
    common = dict(inner_episodes=4, outer_episodes=5, inner_lr=0.3)
    ppo = rl.maml_rl(env, policy, outer="ppo", ppo_epochs=1, ppo_lr=0.01, **common)
    assert ppo.name == "maml_rl_ppo"
    _, grads, _ = rl.maml_rl(env, policy, **common).estimate(params, tasks)
    loss, step, metrics = ppo.estimate(params, tasks)
    eps, horizon = 1e-8, 6  # optax.adam's default eps; the surrogate is a mean over the horizon's steps too
    expected = jax.tree.map(lambda g: 0.01 * g / (jnp.abs(g) + horizon * eps), grads)
    chex.assert_trees_all_close(step, expected, rtol=1e-9, atol=1e-12)
    assert float(metrics["kl"]) > 0 and np.isfinite(float(loss))


def test_ppo_trains_through_fit_and_names_bad_settings():
    env = rl.envs.navigation2d(horizon=10)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(8,))
    learner = rl.maml_rl(env, policy, inner_episodes=4, outer_episodes=4, outer="ppo")
    state = jmaml.fit(learner, rl.task_distribution(env), rl.trpo_optimiser(), policy.init(jax.random.key(0)),
                      steps=2, meta_batch_size=4, log=jmaml.Logging(every=1, progress=False, stream=io.StringIO()))
    assert int(state.step) == 2
    with pytest.raises(ValueError, match="outer='ppo' takes estimator 'lvc' or 'naive'"):
        rl.maml_rl(env, policy, outer="ppo", estimator="dice")
    with pytest.raises(ValueError, match="ppo_clip must be a finite number > 0, got 0"):
        rl.maml_rl(env, policy, outer="ppo", ppo_clip=0)
    with pytest.raises(ValueError, match="ppo_epochs"):
        rl.maml_rl(env, policy, outer="ppo", ppo_epochs=0)
    with pytest.raises(ValueError, match=r"outer must be one of \('gradient', 'trpo', 'ppo', 'promp'\), got 'sgd'"):
        rl.maml_rl(env, policy, outer="sgd")


def test_jmaml_evaluate_scores_an_rl_learner_as_the_paper_reports():
    """One evaluation path: ``jmaml.evaluate.evaluate`` on an RL task distribution with ``rl.return_metric``.
    Oracle: each held-out task by hand -- its key split into the adaptation's and the scoring's, the policies
    after 0, 1, 2 steps taken from the learner's own adapt, each scored by rollouts, summarised by NumPy."""
    env = rl.envs.navigation2d(horizon=5)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(8,))
    learner = rl.maml_rl(env, policy, inner_lr=0.5, inner_episodes=3, outer_episodes=3)
    params = policy.init(jax.random.key(0))
    report = jmaml.evaluate.evaluate(learner, params, rl.task_distribution(env),
                                     metric=rl.return_metric(env, policy, episodes=4), num_tasks=6, num_steps=2,
                                     key=7)["all"]
    assert report["higher_is_better"] is True and report["metric"] == "return" and report["diverged"] == [0, 0, 0]
    tasks = rl.task_distribution(env).heldout(jax.random.key(7), 6)

    @jax.jit
    def by_hand(task_params, key):
        k_adapt, k_score = jax.random.split(key)
        _, policies = learner.adapt(params, rl.RLTask(task_params, k_adapt), 2, observe=lambda phi: phi)
        score = lambda phi: jnp.mean(jnp.sum(  # noqa: E731
            rl.rollouts.rollout(env, policy, phi, task_params, k_score, 4).rewards, axis=1))
        return jax.vmap(score)(policies)

    returns = np.array([by_hand(jax.tree.map(lambda a: a[j], tasks.params), tasks.key[j]) for j in range(6)])
    np.testing.assert_allclose(report["mean"], returns.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(report["ci95"], 1.96 * returns.std(axis=0, ddof=1) / np.sqrt(6), rtol=1e-4)
    assert returns[:, 1].mean() != returns[:, 0].mean()  # the steps change the policy
    np.testing.assert_allclose(rl.returns_after_steps(learner, env, policy, params, key=7, num_tasks=6, num_steps=2,
                                                      eval_episodes=4), returns, rtol=1e-5)


def _gauss_mean(params, obs):
    """The Gaussian MLP policy's mean, written out: ReLU layers of ``{"w", "b"}`` dicts, linear last layer."""
    h = obs.reshape(-1, obs.shape[-1])
    layers = params["mean"]
    for i, layer in enumerate(layers):
        h = h @ layer["w"] + layer["b"][None, :]
        h = jnp.maximum(h, 0.0) if i < len(layers) - 1 else h
    return h  # (steps, action_dim), the steps flattened


def _gauss_logp(params, obs, act):
    z = (act.reshape(-1, act.shape[-1]) - _gauss_mean(params, obs)) / jnp.exp(params["log_std"])[None, :]
    lp = jnp.sum(-0.5 * z ** 2 - params["log_std"][None, :] - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
    return lp.reshape(act.shape[:-1])


def _gauss_kl(old, new, obs):
    """KL(N(μ0, σ0²) ‖ N(μ1, σ1²)) summed over action dimensions, per observation (the textbook formula)."""
    m0, m1 = _gauss_mean(old, obs), _gauss_mean(new, obs)
    s0, s1 = jnp.exp(old["log_std"])[None, :], jnp.exp(new["log_std"])[None, :]
    return jnp.sum(jnp.log(s1 / s0) + (s0 ** 2 + (m0 - m1) ** 2) / (2 * s1 ** 2) - 0.5, axis=-1)


def _reference_trpo_step(env, policy, theta, tasks, *, alpha, n_in, n_out, gamma, max_kl, damping, ls_steps, ratio):
    """One MAML-TRPO meta-step from its definition (Finn et al. 2017 with rllab's TRPO), without jmaml's
    learner: per task the inner LVC policy-gradient step (returns-to-go, no baseline, a mean over the
    episodes' steps), the outer surrogate mean_i Σ_t ρ_t A_t / H with ρ the new/old adapted policies' ratio;
    the constraint the mean over outer states of the analytic KL between the old and new adapted Gaussians;
    the natural gradient by a dense solve of (Hessian of that KL at θ_old + damping I) s = -g; the step
    scaled to sqrt(2 max_kl / sᵀ F s) and backtracked. Episodes come from jmaml.rl.rollouts (the
    environment), with the task keys split as the learner documents (inner, then outer)."""
    from jax.flatten_util import ravel_pytree

    flat0, unravel = ravel_pytree(theta)
    num_tasks = tasks.key.shape[0]

    def returns_to_go(r):
        out = np.zeros_like(r)
        acc = np.zeros(r.shape[0])
        for t in reversed(range(r.shape[1])):
            acc = r[:, t] + gamma * acc
            out[:, t] = acc
        return out

    def adapt(th, traj_in, adv_in):
        def lvc(p):
            lp = _gauss_logp(p, traj_in.obs, traj_in.actions)
            return -jnp.sum(jnp.exp(lp - jax.lax.stop_gradient(lp)) * adv_in) / adv_in.size
        g = jax.grad(lvc)(th)
        return jax.tree.map(lambda p, gi: p - alpha * gi, th, g)

    data = []
    for i in range(num_tasks):
        goal = tasks.params[i]
        k_in, k_out = jax.random.split(tasks.key[i])
        traj_in = rl.rollouts.rollout(env, policy, theta, goal, k_in, n_in)
        adv_in = jnp.asarray(returns_to_go(np.asarray(traj_in.rewards)))
        phi_old = adapt(theta, traj_in, adv_in)
        traj_out = rl.rollouts.rollout(env, policy, phi_old, goal, k_out, n_out)
        adv_out = jnp.asarray(returns_to_go(np.asarray(traj_out.rewards)))
        data.append((traj_in, adv_in, phi_old, traj_out, adv_out,
                     _gauss_logp(phi_old, traj_out.obs, traj_out.actions)))

    def loss(flat):
        total = 0.0
        for traj_in, adv_in, _, traj_out, adv_out, lp_old in data:
            phi = adapt(unravel(flat), traj_in, adv_in)
            rho = jnp.exp(_gauss_logp(phi, traj_out.obs, traj_out.actions) - lp_old)
            total = total + jnp.sum(rho * adv_out) / (n_out * env.horizon)
        return -total / num_tasks

    def mean_kl(flat):
        kls = [_gauss_kl(phi_old, adapt(unravel(flat), traj_in, adv_in), traj_out.obs)
               for traj_in, adv_in, phi_old, traj_out, _, _ in data]
        return jnp.mean(jnp.stack(kls))

    fisher = np.asarray(jax.hessian(mean_kl)(flat0)) + damping * np.eye(flat0.size)
    g = np.asarray(jax.grad(loss)(flat0))
    s = np.linalg.solve(fisher, -g)
    full = np.sqrt(2 * max_kl / (s @ fisher @ s)) * s
    loss0 = float(loss(flat0))
    for j in range(ls_steps):
        cand = flat0 + ratio ** j * full
        if float(loss(cand)) < loss0 and float(mean_kl(cand)) <= max_kl:
            return unravel(flat0 - cand), fisher, float(mean_kl(cand)), j + 1
    return unravel(flat0 * 0), fisher, 0.0, 0


@pytest.mark.slow
def test_trpo_is_the_references_step_with_the_analytic_kl(x64):
    """outer='trpo' equals a TRPO step written from the definition above (float64): the analytic KL's
    Hessian as the Fisher metric, a converged natural gradient, the same trust region and line search."""
    env = rl.envs.navigation2d(horizon=6)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(4,))
    theta = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), policy.init(jax.random.key(0)))
    tasks = rl.task_distribution(env).sample(jax.random.key(1), 3)
    tasks = rl.RLTask(jnp.asarray(tasks.params, jnp.float64), tasks.key)
    settings = dict(alpha=0.3, n_in=3, n_out=4, gamma=0.9, max_kl=0.01, damping=1e-5, ls_steps=15, ratio=0.8)
    want, fisher, want_kl, want_j = _reference_trpo_step(env, policy, theta, tasks, **settings)
    assert want_j >= 1 and np.linalg.eigvalsh(fisher).min() > 0  # the analytic KL's Hessian: PSD (+ damping)
    learner = rl.maml_rl(env, policy, inner_lr=0.3, inner_episodes=3, outer_episodes=4, gamma=0.9, baseline=None,
                         normalize_advantages=False, outer="trpo", max_kl=0.01, cg_damping=1e-5, cg_iters=200,
                         cg_tol=1e-13, line_search_steps=15, backtrack_ratio=0.8)
    _, step, metrics = learner.estimate(theta, tasks)
    assert int(metrics["line_search_steps"]) == want_j
    np.testing.assert_allclose(float(metrics["kl"]), want_kl, rtol=1e-7)
    for a, b in zip(jax.tree.leaves(step), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-12)


def test_trpo_steps_where_the_sample_kl_stood_still():
    """The case where the sample-KL TRPO met negative curvature and took exactly zero steps (navigation2d,
    4 tasks x 5+5 episodes, horizon 20, a 2-32-32-2 policy): the analytic-KL step is accepted in the region."""
    env = rl.envs.navigation2d(horizon=20)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(32, 32))
    learner = rl.maml_rl(env, policy, inner_episodes=5, outer_episodes=5, outer="trpo", max_kl=0.01)
    params = policy.init(jax.random.key(0))
    _, step, metrics = jax.jit(learner.estimate)(params, rl.task_distribution(env).sample(jax.random.key(1), 4))
    assert int(metrics["line_search_steps"]) >= 1 and 0 < float(metrics["kl"]) <= 0.01
    assert float(optax.global_norm(step)) > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"outer": "trpo", "max_kl": -1.0}, r"max_kl must be a finite number > 0, got -1.0"),
    ({"outer": "trpo", "max_kl": 0}, r"max_kl must be a finite number > 0, got 0"),
    ({"outer": "trpo", "line_search_steps": 0}, r"line_search_steps must be >= 1, got 0"),
    ({"outer": "trpo", "backtrack_ratio": 1.5}, r"backtrack_ratio must be a number in \(0, 1\), got 1.5"),
    ({"outer": "trpo", "cg_iters": 0}, r"cg_iters must be >= 1, got 0"),
    ({"cg_damping": -1}, r"cg_damping must be a finite number >= 0, got -1"),
    ({"cg_tol": float("nan")}, r"cg_tol must be a finite number >= 0, got nan"),
    ({"inner_lr": -0.1}, r"inner_lr must be > 0"),
    ({"inner_lr": 0.0}, r"inner_lr must be > 0"),
    ({"inner_lr": float("inf")}, r"inner_lr must be finite"),
    ({"ppo_clip": -0.2}, r"ppo_clip must be a finite number > 0, got -0.2"),
    ({"ppo_lr": float("inf")}, r"ppo_lr must be a finite number > 0, got inf"),
    ({"gamma": float("nan")}, r"gamma must be a number in \[0, 1\], got nan"),
    ({"normalize_advantages": "yes"}, r"normalize_advantages must be True or False"),
])
def test_every_setting_that_would_make_training_a_silent_no_op_is_named(kwargs, message):
    env, policy = rl.envs.navigation2d(horizon=5), rl.policies.gaussian_mlp(2, 2, hidden=(4,))
    with pytest.raises((ValueError, TypeError), match=message):
        rl.maml_rl(env, policy, **kwargs)


def test_environment_families_name_bad_settings():
    with pytest.raises(ValueError, match=r"mass_range must be a pair \(low, high\) .*0 < low <= high, got \(-1, 0\)"):
        rl.envs.pendulum(mass_range=(-1, 0))
    with pytest.raises(ValueError, match=r"length_range must be a pair"):
        rl.envs.pendulum(length_range=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"max_action must be a finite number > 0"):
        rl.envs.navigation2d(max_action=0)
    with pytest.raises(ValueError, match=r"goal_tolerance must be a finite number > 0"):
        rl.envs.navigation2d(goal_tolerance=-0.01)
    with pytest.raises(ValueError, match=r"init_std must be a finite number > 0, got inf"):
        rl.policies.gaussian_mlp(2, 2, init_std=float("inf"))


def test_a_step_returning_learner_refuses_any_optimiser_but_its_own():
    env, policy = rl.envs.navigation2d(horizon=5), rl.policies.gaussian_mlp(2, 2, hidden=(4,))
    dist, params = rl.task_distribution(env), policy.init(jax.random.key(0))
    log = jmaml.Logging(every=1, progress=False, stream=io.StringIO())
    trpo = rl.maml_rl(env, policy, inner_episodes=2, outer_episodes=2, outer="trpo")
    assert trpo.returns_step
    with pytest.raises(ValueError, match=r"learner 'maml_rl_trpo' returns its update itself .* jmaml.apply_step\(\)"):
        jmaml.fit(trpo, dist, optax.adam(1e-3), params, steps=1, meta_batch_size=2, log=log)
    with pytest.raises(ValueError, match=r"learner 'maml_rl_trpo' returns its update itself"):
        jmaml.fit(trpo, dist, optax.sgd(1.0), params, steps=1, meta_batch_size=2, log=log)
    gradient = rl.maml_rl(env, policy, inner_episodes=2, outer_episodes=2)
    with pytest.raises(ValueError, match=r"learner 'maml_rl' returns a gradient"):
        jmaml.fit(gradient, dist, rl.trpo_optimiser(), params, steps=1, meta_batch_size=2, log=log)
    with pytest.raises(ValueError, match=r"learner 'maml_rl_trpo' returns its update itself"):
        jmaml.fit_population(trpo, dist, optax.adam(1e-3), params, {"inner_lr": [0.1, 0.2]}, steps=1,
                             meta_batch_size=2, log=log)


def test_navigation_ends_an_episode_at_the_goal_as_the_reference_environment(x64):
    """goal_tolerance=0.01: done once |x - gx| < 0.01 and |y - gy| < 0.01; the step that arrives counts,
    the rest of the episode is masked (zero reward and mask)."""
    env = rl.envs.navigation2d(horizon=8, goal_tolerance=0.01)
    goal = jnp.asarray([0.25, 0.0])

    def step_policy(params, obs, key):  # a deterministic policy: 0.1 along x
        return jnp.asarray([0.1, 0.0])

    policy = rl.policies.gaussian_mlp(2, 2, hidden=(4,))._replace(sample=step_policy)
    goal_near = jnp.asarray([0.3, 0.005])  # reached at the third step (0.3, 0): |dx| < 0.01, |dy| < 0.01
    traj = rl.rollouts.rollout(env, policy, policy.init(jax.random.key(0)), goal_near, jax.random.key(1), 1)
    np.testing.assert_array_equal(traj.mask[0], [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(traj.rewards[0, :3], [-np.hypot(0.2, 0.005), -np.hypot(0.1, 0.005), -0.005])
    np.testing.assert_array_equal(traj.rewards[0, 3:], 0.0)
    far = rl.rollouts.rollout(env, policy, policy.init(jax.random.key(0)), goal, jax.random.key(1), 1)
    assert float(far.mask.sum()) == 8  # passes 0.25 between steps, never within 0.01 on x: never done


@pytest.mark.parametrize("k,estimator", [(1, "lvc"), (2, "lvc"), (1, "emaml")])
def test_trpos_gauss_newton_fisher_is_the_kl_hessian(x64, k, estimator):
    """The default Fisher-vector product (Jᵀ H J through the re-adaptation; for one inner step Jᵀ from J's own
    linearisation, J being symmetric) and the KL's Hessian by forward over reverse give the same TRPO step to
    round-off (float64; a few CG iterations so round-off is not amplified)."""
    env = rl.envs.navigation2d(horizon=6)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(8,))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), policy.init(jax.random.key(0)))
    tasks = rl.task_distribution(env).sample(jax.random.key(3), 3)
    steps = [rl.maml_rl(env, policy, inner_episodes=4, outer_episodes=4, outer="trpo", cg_iters=3, num_inner_steps=k,
                        estimator=estimator, trpo_fisher=f).estimate(params, tasks)[1]
             for f in ("gauss_newton", "hessian")]
    chex.assert_trees_all_close(steps[0], steps[1], rtol=1e-11, atol=1e-14)
    with pytest.raises(ValueError, match="trpo_fisher must be one of .*got 'exact'"):
        rl.maml_rl(env, policy, outer="trpo", trpo_fisher="exact")


def test_trpos_fisher_on_a_subsample_of_tasks(x64):
    """cg_subsample = 1/2 on a meta-batch that is the same two tasks twice: the first half's Fisher is the whole
    batch's, so the step equals the full one; on distinct tasks it is another step, accepted in the region."""
    env = rl.envs.navigation2d(horizon=6)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(8,))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), policy.init(jax.random.key(0)))
    two = rl.task_distribution(env).sample(jax.random.key(3), 2)
    twice = jax.tree.map(lambda x: jnp.concatenate([x, x]), two)
    make = lambda f: rl.maml_rl(env, policy, inner_episodes=4, outer_episodes=4, outer="trpo", cg_iters=4,  # noqa: E731
                                cg_subsample=f)
    chex.assert_trees_all_close(make(0.5).estimate(params, twice)[1], make(1.0).estimate(params, twice)[1],
                                rtol=1e-10, atol=1e-13)
    tasks = rl.task_distribution(env).sample(jax.random.key(4), 4)
    _, step, metrics = make(0.25).estimate(params, tasks)
    _, full, _ = make(1.0).estimate(params, tasks)
    assert int(metrics["line_search_steps"]) >= 1 and 0 < float(metrics["kl"]) <= 0.01
    assert not np.allclose(jax.tree.leaves(step)[0], jax.tree.leaves(full)[0])
    with pytest.raises(ValueError, match=r"cg_subsample must be a number in \(0, 1\], got 0"):
        make(0)
    with pytest.raises(ValueError, match="cg_subsample=0.5 takes trpo_fisher='gauss_newton'"):
        rl.maml_rl(env, policy, outer="trpo", cg_subsample=0.5, trpo_fisher="hessian")


def _first_batches(env, policy, learner, params, tasks, n_in, n_out):
    """Every task's first inner batch (at ``params``) and outer episodes (at its adapted policy), drawn again
    from the task's keys as the inner loop draws them (k = 1)."""
    def one(task_params, key):
        k_in, k_out = jax.random.split(key, 2)
        first = rl.rollouts.rollout(env, policy, params, task_params, k_in, n_in)
        phi = learner.adapt(params, rl.RLTask(task_params, key), 1)
        return first, rl.rollouts.rollout(env, policy, phi, task_params, k_out, n_out)

    return jax.vmap(one)(tasks.params, tasks.key)


def test_emaml_is_the_naive_gradient_plus_its_exploration_term(x64):
    """E-MAML's meta-gradient minus the naive one is the gradient of its exploration term, computed here from
    the episodes drawn again: minus each task's post-update mean reward standardised over the meta-batch (NumPy)
    times the mean log-likelihood of its first inner batch."""
    env = rl.envs.navigation2d(horizon=6)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(5,))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), policy.init(jax.random.key(0)))
    tasks = rl.task_distribution(env).sample(jax.random.key(1), 4)
    common = dict(inner_episodes=3, outer_episodes=4, inner_lr=0.3)
    e = rl.emaml(env, policy, outer="gradient", **common)
    assert e.name == "maml_rl_emaml" and e.label == "E-MAML"
    _, g_e, _ = e.estimate(params, tasks)
    naive = rl.maml_rl(env, policy, estimator="naive", **common)
    _, g_n, _ = naive.estimate(params, tasks)
    first, outer = _first_batches(env, policy, naive, params, tasks, 3, 4)
    r, m = np.asarray(outer.rewards), np.asarray(outer.mask)
    mean, std = r[m > 0].mean(), r[m > 0].std()
    w = ((r * m).sum(axis=(1, 2)) / m.sum(axis=(1, 2)) - mean) / (std + 1e-8)

    def term(p):
        lp = jax.vmap(lambda t: rl.rollouts.log_probs(policy, p, t))(first)
        return jnp.mean(-w * jnp.sum(lp, axis=(1, 2)) / jnp.sum(first.mask, axis=(1, 2)))

    expected = jax.tree.map(jnp.add, g_n, jax.grad(term)(params))
    chex.assert_trees_all_close(g_e, expected, rtol=1e-9, atol=1e-12)


def test_promp_is_ppo_at_its_clip_plus_the_inner_kl_penalty(x64):
    """ProMP without its penalty is PPO-clip at clip 0.3; with it, the reported inner KL is the analytic KL
    between θ_old and the new θ on the first inner batch's states (drawn again), and a large penalty keeps
    the pre-update policy closer."""
    env = rl.envs.navigation2d(horizon=6)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(5,))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), policy.init(jax.random.key(0)))
    tasks = rl.task_distribution(env).sample(jax.random.key(1), 3)
    common = dict(inner_episodes=3, outer_episodes=4, inner_lr=0.3, ppo_lr=0.05)
    p = rl.promp(env, policy, **common)
    assert p.name == "maml_rl_promp" and p.returns_step
    _, step0, _ = rl.promp(env, policy, inner_kl_penalty=0.0, **common).estimate(params, tasks)
    _, ppo_step, _ = rl.maml_rl(env, policy, outer="ppo", ppo_clip=0.3, **common).estimate(params, tasks)
    chex.assert_trees_all_close(step0, ppo_step, rtol=1e-12, atol=1e-15)
    _, step, metrics = p.estimate(params, tasks)
    new = jax.tree.map(jnp.subtract, params, step)
    first, _ = _first_batches(env, policy, p, params, tasks, 3, 4)

    def kl_task(t):
        kl = jax.vmap(jax.vmap(policy.kl, (None, None, 0)), (None, None, 0))(params, new, t.obs) * t.mask
        return jnp.sum(kl) / jnp.sum(t.mask)

    np.testing.assert_allclose(float(metrics["inner_kl"]), float(jnp.mean(jax.vmap(kl_task)(first))), rtol=1e-9)
    _, _, tight = rl.promp(env, policy, inner_kl_penalty=1e4, **common).estimate(params, tasks)
    assert 0 < float(tight["inner_kl"]) < float(metrics["inner_kl"])


def test_promp_and_emaml_train_and_name_bad_settings():
    env = rl.envs.navigation2d(horizon=8)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=(8,))
    for learner in (rl.promp(env, policy, inner_episodes=3, outer_episodes=3),
                    rl.emaml(env, policy, inner_episodes=3, outer_episodes=3)):
        state = jmaml.fit(learner, rl.task_distribution(env), rl.trpo_optimiser(), policy.init(jax.random.key(0)),
                          steps=2, meta_batch_size=3, log=jmaml.Logging(every=1, progress=False, stream=io.StringIO()))
        assert int(state.step) == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    with pytest.raises(ValueError, match="outer='promp' is ProMP, whose estimator is 'lvc' \\(got 'naive'\\)"):
        rl.maml_rl(env, policy, outer="promp", estimator="naive")
    with pytest.raises(ValueError, match="estimator='emaml' takes outer 'gradient' or 'trpo'.*got 'ppo'"):
        rl.maml_rl(env, policy, outer="ppo", estimator="emaml")
    with pytest.raises(ValueError, match="emaml.*needs num_inner_steps >= 1"):
        rl.maml_rl(env, policy, estimator="emaml", num_inner_steps=0)
    with pytest.raises(ValueError, match="inner_kl_penalty"):
        rl.promp(env, policy, inner_kl_penalty=-1.0)
    with pytest.raises(ValueError, match="outer 'promp' with estimator 'dice'"):
        rl.recipe.RLConfig(outer="promp", estimator="dice").validate()


@pytest.mark.slow
def test_jmaml_rl_trains_promp_and_emaml(tmp_path):
    """``jmaml rl --outer promp`` and ``--estimator emaml`` (E-MAML-TRPO) train, checkpoint and evaluate."""
    for flags, name in ((("--outer", "promp"), "maml_rl_promp"), (("--estimator", "emaml"), "maml_rl_emaml_trpo")):
        out = tmp_path / name
        cmd, env, root = _rl_cli(out, *flags, "--steps", "4")
        run = procs.run(cmd, env=env, cwd=root, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        assert (out / f"{name}.ckpt.npz").exists() and (out / "eval.json").exists()
        assert "maml_best" in run.stdout
