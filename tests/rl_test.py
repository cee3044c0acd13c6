"""Meta-RL (jmaml.rl): the meta-gradient estimators against the exact meta-gradient of a bandit, enumerated
in float64; environments, policies and their checks; training through jmaml.fit."""

import io
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmaml
from jmaml import rl

ALPHA = 1.4
REWARDS = np.array([0.2, 0.9])
THETA = np.array([[0.3, -0.2], [-0.4, 0.5]])  # logits: a row per pull


def _exact(theta, alpha, rewards, inner_episodes, horizon=2, naive=False, lvc=False):
    """E_τ[J_out(θ + α ĝ(θ, τ))] by enumerating every inner sample τ (inner_episodes episodes of `horizon`
    pulls), written without jmaml.rl: log-softmax of a table, returns-to-go by hand. ``naive``: the inner
    samples' probabilities held constant (what the naive estimator's expectation differentiates); ``lvc``: also
    the inner gradient through each step's likelihood ratio (ProMP's LVC estimator's expectation)."""
    seqs = list(itertools.product(range(2), repeat=horizon))
    r = jnp.asarray(rewards)

    def logp(th, seq):
        return sum(jax.nn.log_softmax(th[t])[a] for t, a in enumerate(seq))

    def j_out(phi):
        return sum(jnp.exp(logp(phi, s)) * sum(r[a] for a in s) for s in seqs)

    def inner_grad(th, episodes):
        def objective(p):
            total = 0.0
            for s in episodes:
                for t in range(horizon):
                    lp = jax.nn.log_softmax(p[t])[s[t]]
                    weight = jnp.exp(lp - jax.lax.stop_gradient(lp)) if lvc else lp
                    total = total + weight * sum(r[a] for a in s[t:])
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


def _mc(estimator, num_tasks=80_000, groups=80, inner_episodes=2):
    env = rl.envs.bandit(2, 2)
    policy = rl.policies.tabular_softmax(2, 2)
    learner = rl.maml_rl(env, policy, inner_lr=ALPHA, inner_episodes=inner_episodes, outer_episodes=1, gamma=1.0,
                         baseline=None, normalize_advantages=False, estimator=estimator)
    per = num_tasks // groups
    keys = jax.random.split(jax.random.key(7), num_tasks).reshape(groups, per)
    tasks = rl.RLTask(jnp.broadcast_to(jnp.asarray(REWARDS), (groups, per, 2)), keys)
    grads = jax.jit(jax.vmap(lambda t: learner.estimate(jnp.asarray(THETA), t)[1]))(tasks)
    grads = -np.asarray(grads)  # the learner minimises minus the return
    return grads.mean(0), grads.std(0, ddof=1) / np.sqrt(groups)


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
    got = np.asarray(rl.rollouts.linear_baseline(traj, returns, reg=0.0))
    obs = np.clip(np.asarray(traj.obs), -10, 10)
    t = np.broadcast_to(np.arange(12)[None, :, None] / 100.0, (5, 12, 1))
    feats = np.concatenate([obs, obs ** 2, t, t ** 2, t ** 3, np.ones_like(t)], -1).reshape(-1, 10)
    w = np.linalg.lstsq(feats, np.asarray(returns).reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(got.reshape(-1), feats @ w, rtol=1e-8, atol=1e-8)
    assert np.isfinite(got).all()


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
    new = jax.tree.map(lambda p, s: p - s, params, step)
    assert float(optax.global_norm(step)) > 0
    # the same samples, evaluated at the new parameters by a second estimate with a zero trust region: the
    # line search then accepts nothing, so its step is zero
    frozen = rl.maml_rl(env, policy, inner_episodes=4, outer_episodes=4, outer="trpo", max_kl=0.0)
    assert float(optax.global_norm(jax.jit(frozen.estimate)(new, tasks)[1])) == 0.0
    state = jmaml.fit(learner, rl.task_distribution(env), rl.trpo_optimiser(), params, steps=2, meta_batch_size=4,
                      log=jmaml.Logging(every=1, progress=False, stream=io.StringIO()))
    assert int(state.step) == 2
    with pytest.raises(ValueError, match="outer='trpo' takes estimator 'lvc' or 'naive'"):
        rl.maml_rl(env, policy, outer="trpo", estimator="dice")


def _rl_cli(out, *extra):
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": root})
    cmd = [sys.executable, "-m", "jmaml", "rl", "--out", str(out), "--steps", "30", "--log-every", "2",
           "--episodes", "3", "--horizon", "8", "--hidden", "8", "--meta-batch-size", "4", "--no-pretrain",
           "--outer", "trpo", *extra]
    return cmd, env, root


def test_an_rl_run_killed_by_sigkill_resumes_bitwise(tmp_path):
    import signal
    import subprocess
    import time

    from jmaml import checkpoint

    cmd, env, root = _rl_cli(tmp_path / "straight", "--no-eval")
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cmd, env, root = _rl_cli(tmp_path / "killed", "--no-eval")
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "maml_rl_trpo.ckpt.npz"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and 0 < checkpoint.read_header(ckpt)["step"] < 30:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(cmd + ["--resume"], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = checkpoint.arrays(tmp_path / "straight" / "maml_rl_trpo.ckpt.npz")
    b = checkpoint.arrays(ckpt)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # evaluation: eval.json and the table
    cmd = [c for c in cmd if c != "--no-eval"]
    out = subprocess.run(cmd + ["--resume"], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "| maml |" in out.stdout and "| random |" in out.stdout, out.stderr[-2000:]
    assert (tmp_path / "killed" / "eval.json").exists()


def test_the_rl_command_names_bad_settings(tmp_path):
    import subprocess

    cmd, env, root = _rl_cli(tmp_path / "x", "--horizon", "0")
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "horizon must be" in out.stderr, out.stderr[-1000:]


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
    with pytest.raises(ValueError, match="ppo_clip must be a positive number, got 0"):
        rl.maml_rl(env, policy, outer="ppo", ppo_clip=0)
    with pytest.raises(ValueError, match="ppo_epochs"):
        rl.maml_rl(env, policy, outer="ppo", ppo_epochs=0)
    with pytest.raises(ValueError, match=r"outer must be one of \('gradient', 'trpo', 'ppo'\), got 'sgd'"):
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
