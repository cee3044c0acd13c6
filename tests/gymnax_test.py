"""gymnax environments as jmaml task families (jmaml.rl.gymnax), with the real gymnax package (the optional
extra jmaml[gymnax]; skipped where it is not installed)."""

import io
import sys

import jax
import numpy as np
import procs
import pytest

import jmaml
from jmaml import rl

gymnax = pytest.importorskip("gymnax", reason="the optional extra jmaml[gymnax] is not installed")
from jmaml.rl import gymnax as gx  # noqa: E402


def test_the_hand_ported_pendulum_is_gymnax_pendulum():
    """jmaml's own pendulum (kept: it needs no optional package) is gymnax's Pendulum-v1 at the task's mass and
    length: the same start from the same key, the same observations and rewards under the same torques."""
    ours = rl.envs.pendulum(horizon=30)
    theirs = gx.family("Pendulum-v1", ranges={"m": (0.5, 1.5), "l": (0.5, 1.5)}, horizon=30)
    task = ours.sample_task(jax.random.key(0))
    params = gymnax.make("Pendulum-v1")[1].replace(m=task.mass, l=task.length)
    key = jax.random.key(1)
    obs_a, s_a = ours.reset(key, task)
    obs_b, s_b = theirs.reset(key, params)
    np.testing.assert_allclose(obs_a, obs_b, rtol=1e-6, atol=1e-7)
    torques = jax.random.uniform(jax.random.key(2), (30, 1), minval=-3.0, maxval=3.0)  # past the clip too
    for u in torques:
        obs_a, s_a, r_a, d_a = ours.step(key, s_a, u, task)
        obs_b, s_b, r_b, d_b = theirs.step(key, s_b, u, params)
        np.testing.assert_allclose(obs_a, obs_b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r_a, r_b, rtol=1e-5, atol=1e-5)
        assert not bool(d_a) and not bool(d_b)


def test_cartpole_tasks_draw_consistent_physics_and_episodes_end_early():
    env = rl.envs.cartpole(horizon=60)
    assert (env.observation_shape, env.action_shape, env.num_actions) == ((4,), (), 2)
    tasks = jax.vmap(env.sample_task)(jax.random.split(jax.random.key(0), 50))
    assert 0.25 <= float(tasks.length.min()) and float(tasks.length.max()) <= 1.0
    np.testing.assert_allclose(tasks.total_mass, tasks.masscart + tasks.masspole, rtol=1e-6)
    np.testing.assert_allclose(tasks.polemass_length, tasks.masspole * tasks.length, rtol=1e-6)
    policy = gx.policy_for(env, (16,))
    traj = rl.rollouts.rollout(env, policy, policy.init(jax.random.key(1)), jax.tree.map(lambda x: x[0], tasks),
                               jax.random.key(2), 8)
    lengths = np.asarray(traj.mask.sum(axis=1))
    assert lengths.min() < 60  # a random policy drops the pole: the rest of its episode is masked
    np.testing.assert_array_equal(np.asarray(traj.rewards.sum(axis=1)), lengths)  # reward 1 per step alive


def test_a_gymnax_family_meta_trains_through_fit():
    env = gx.family("CartPole-v1", ranges={"length": (0.3, 0.8)}, horizon=30)
    policy = gx.policy_for(env, (16,))
    for outer, opt in (("trpo", rl.trpo_optimiser()), ("gradient", __import__("optax").adam(1e-2))):
        learner = rl.maml_rl(env, policy, inner_episodes=4, outer_episodes=4, outer=outer)
        state = jmaml.fit(learner, rl.task_distribution(env), opt, policy.init(jax.random.key(0)), steps=2,
                          meta_batch_size=3, log=jmaml.Logging(every=1, progress=False, stream=io.StringIO()))
        assert int(state.step) == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    report = jmaml.evaluate.evaluate(learner, state.params, rl.task_distribution(env),
                                     metric=rl.return_metric(env, policy, episodes=3), num_tasks=4, num_steps=1)
    assert report["all"]["metric"] == "return" and len(report["all"]["mean"]) == 2


def test_the_adapter_names_bad_input():
    with pytest.raises(ValueError, match="'Chess-v0' is not a gymnax environment"):
        gx.family("Chess-v0", ranges={})
    with pytest.raises(ValueError, match="'mass' is not a field of EnvParams; it has .*'masspole'"):
        gx.family("CartPole-v1", ranges={"mass": (0.1, 0.2)})
    with pytest.raises(ValueError, match=r"ranges\['length'\] must be a pair"):
        gx.family("CartPole-v1", ranges={"length": (1.0, 0.5)})
    with pytest.raises(ValueError, match="one of the two"):
        gx.family("CartPole-v1")


@pytest.mark.slow
def test_jmaml_rl_trains_and_evaluates_cartpole(tmp_path):
    out = tmp_path / "cartpole"
    cmd = [sys.executable, "-m", "jmaml", "rl", "--env", "cartpole", "--out", str(out), "--steps", "2",
           "--log-every", "1", "--episodes", "3", "--horizon", "20", "--hidden", "8", "--meta-batch-size", "3",
           "--eval-tasks", "3", "--eval-episodes", "2", "--validation-tasks", "2", "--baseline-lrs", "0.1"]
    run = procs.run(cmd, env=procs.clean_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "maml_rl_trpo.ckpt.npz").exists() and "| cartpole |" in run.stdout
