"""Meta-reinforcement learning on the device: environment families as pure functions, rollouts as a
``lax.scan`` vmapped over episodes and tasks, and MAML with a policy-gradient inner loop (``maml_rl``) as a
``MetaLearner`` that ``jmaml.fit`` trains like any other.

    >>> import jax, optax, jmaml
    >>> from jmaml import rl
    >>> env = rl.envs.navigation2d(horizon=10)
    >>> policy = rl.policies.gaussian_mlp(2, 2, hidden=(16,))
    >>> learner = rl.maml_rl(env, policy, inner_lr=0.1, inner_episodes=4, outer_episodes=4)
    >>> state = jmaml.fit(learner, rl.task_distribution(env), optax.adam(1e-2), policy.init(jax.random.key(0)),
    ...                   steps=2, meta_batch_size=4, log=jmaml.Logging(every=1, progress=False))
    >>> int(state.step)
    2
"""

import importlib
from typing import Any

from jmaml.rl import envs, policies, rollouts
from jmaml.rl.envs import Env
from jmaml.rl.learner import RLTask, check_policy, emaml, maml_rl, promp, task_distribution, trpo_optimiser
from jmaml.rl.policies import Policy

# Evaluation (the engine's) and the recipe (the run layer's) live in their layers' folders; their names here
# are kept, loaded on first use so this folder imports nothing above it. gymnax, brax: the optional extras' adapters.
_ABOVE = {"evaluation": ("jmaml.engine.rl_evaluation", None), "recipe": ("jmaml.run.rl_recipe", None),
          "gymnax": ("jmaml.rl.gymnax", None), "brax": ("jmaml.rl.brax", None),
          "return_metric": ("jmaml.engine.rl_evaluation", "return_metric"),
          "returns_after_steps": ("jmaml.engine.rl_evaluation", "returns_after_steps")}


def __getattr__(name: str) -> Any:
    if name not in _ABOVE:
        raise AttributeError(f"module 'jmaml.rl' has no attribute {name!r}")
    module, attr = _ABOVE[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


__all__ = ["Env", "Policy", "RLTask", "brax", "check_policy", "emaml", "envs", "evaluation", "gymnax", "maml_rl",
           "policies",
           "promp", "recipe",
           "return_metric", "returns_after_steps", "rollouts", "task_distribution", "trpo_optimiser"]
