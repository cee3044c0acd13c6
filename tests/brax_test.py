"""The MAML paper's locomotion tasks on brax (jmaml.rl.brax), with the real brax package (the optional extra
jmaml[brax]; skipped where it is not installed). Tiny settings: a few meta-steps train, resume bitwise and
evaluate."""

import dataclasses

import jax
import numpy as np
import pytest

from jmaml import rl

pytest.importorskip("brax", reason="the optional extra jmaml[brax] is not installed")
from jmaml.rl import brax as rb  # noqa: E402

# brax and mujoco warn about their own deprecations on import and model load
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def test_the_rewards_are_the_references():
    """One step from brax's own state: the task reward recomputed from brax's forward velocity and the action."""
    for name, ctrl, survive in (("halfcheetah_velocity", 0.05, 0.0), ("ant_direction", 0.005, 0.05)):
        env = rb.family(name, horizon=3)
        task = env.sample_task(jax.random.key(0))
        _, state = env.reset(jax.random.key(1), task)
        action = 0.3 * np.ones(env.action_shape, np.float32)
        _, new, reward, _ = env.step(jax.random.key(2), state, action, task)
        v = float(new.metrics["x_velocity"])
        forward = -abs(v - float(task)) if name.endswith("velocity") else float(task) * v
        np.testing.assert_allclose(float(reward), forward - ctrl * float(np.sum(action ** 2)) + survive, rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="robot must be one of"):
        rb.locomotion("hopper")


@pytest.mark.parametrize("env_name", ["halfcheetah_velocity", "halfcheetah_direction", "ant_direction"])
def test_locomotion_trains_resumes_bitwise_and_evaluates(tmp_path, env_name):
    from jmaml.engine import Interrupted

    config = rl.recipe.RLConfig(env=env_name, horizon=4, steps=2, meta_batch_size=2, inner_episodes=2,
                                outer_episodes=2, hidden=(8,), log_every=1, eval_tasks=2, eval_episodes=2,
                                eval_steps=1, validation_tasks=2, baseline_lrs=(0.1,), pretrain=False).validate()
    whole = rl.recipe.train(config, str(tmp_path / "whole"), progress=False)
    with pytest.raises(Interrupted):
        rl.recipe.train(config, str(tmp_path / "cut"), progress=False, stop_at_step=1)
    resumed = rl.recipe.train(config, str(tmp_path / "cut"), resume=True, progress=False)
    for a, b in zip(jax.tree.leaves(whole["maml"]), jax.tree.leaves(resumed["maml"])):
        np.testing.assert_array_equal(a, b)
    results = rl.recipe.evaluate(config, whole, str(tmp_path / "whole"))
    assert np.isfinite(results["maml"]["mean"]).all()
    assert dataclasses.asdict(config)["env"] == env_name


@pytest.fixture(autouse=True)
def _brax_broadcasts():
    """brax's own code broadcasts by rank promotion, which the suite otherwise raises on."""
    with jax.numpy_rank_promotion("allow"):
        yield
