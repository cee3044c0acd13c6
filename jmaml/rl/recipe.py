"""A meta-RL run from a handful of settings, as ``jmaml rl`` runs it: MAML and the multi-task "pretrained"
policy trained through ``jmaml.fit`` in one run folder (progress, checkpoints, bitwise resume, the
fingerprint), then evaluated as the paper reports it (``eval.json``, ``eval.md``)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TextIO

import jax
import optax

from jmaml._checks import check_positive_int
from jmaml.rl import envs, evaluation
from jmaml.rl.learner import maml_rl, task_distribution, trpo_optimiser
from jmaml.rl.policies import gaussian_mlp

METHODS = ("maml", "pretrained", "random")
OUTER_STEPS = ("trpo", "ppo", "adam")  # MAML's outer step: maml_rl's outer, "adam" its "gradient"


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The settings of a meta-RL run (the MAML paper's for 2D navigation by default)."""

    env: str = "navigation2d"
    horizon: int = 100
    steps: int = 100
    meta_batch_size: int = 20
    inner_lr: float = 0.1
    inner_episodes: int = 20
    outer_episodes: int = 20
    gamma: float = 0.99
    hidden: tuple[int, ...] = (100, 100)
    outer: str = "trpo"  # MAML's outer step: "trpo", "ppo" (PPO-clip) or "adam"
    meta_lr: float = 0.01  # Adam's rate (the pretrained policy's, and MAML's with outer="adam")
    estimator: str = "lvc"
    seed: int = 0
    log_every: int = 5
    pretrain: bool = True
    eval_tasks: int = 40
    eval_episodes: int = 20
    eval_steps: int = 3

    def validate(self) -> RLConfig:
        if self.env not in envs.ENVS or self.env == "bandit":
            raise ValueError(f"env must be one of {sorted(set(envs.ENVS) - {'bandit'})}, got {self.env!r}")
        for name in ("horizon", "steps", "meta_batch_size", "inner_episodes", "outer_episodes", "log_every",
                     "eval_tasks", "eval_episodes"):
            check_positive_int(getattr(self, name), name)
        if self.outer not in OUTER_STEPS:
            raise ValueError(f"outer must be one of {OUTER_STEPS}, got {self.outer!r}")
        return self

    def parts(self):
        """``(env, policy, maml learner, pretrained learner)``."""
        env = envs.ENVS[self.env](horizon=self.horizon)
        policy = gaussian_mlp(env.observation_shape[0], env.action_shape[0], hidden=self.hidden)
        common = dict(inner_lr=self.inner_lr, inner_episodes=self.inner_episodes, outer_episodes=self.outer_episodes,
                      gamma=self.gamma)
        maml = maml_rl(env, policy, estimator=self.estimator, outer="gradient" if self.outer == "adam" else self.outer,
                       **common)
        return env, policy, maml, maml_rl(env, policy, num_inner_steps=0, **common)


def train(config: RLConfig, run_dir: str | None, *, resume: bool = False, overwrite: bool = False,
          stream: TextIO | None = None, progress: bool = True, stop_at_step: int | None = None) -> dict[str, Any]:
    """MAML's (and, with ``pretrain``, the pretrained policy's) parameters, each trained by ``jmaml.fit`` in
    ``run_dir`` (``maml_rl*.ckpt.npz``, ``pretrained_rl.ckpt.npz``, ``metrics.jsonl``); ``random`` is the
    initialisation. ``resume`` continues (or returns) the runs there."""
    from jmaml.engine import Logging, RunDir, fit

    config.validate()
    env, policy, maml, pretrained = config.parts()
    params = policy.init(jax.random.key(config.seed))
    out = {"random": params}
    if run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "rl_config.json")
        if overwrite or not os.path.exists(path):  # a resume with other settings is refused by fit, not recorded
            with open(path, "w", encoding="utf-8") as f:
                json.dump(dataclasses.asdict(config), f, indent=2)
    phases = [("maml", maml)] + ([("pretrained", pretrained)] if config.pretrain else [])
    for method, learner in phases:
        optimiser = trpo_optimiser() if method == "maml" and config.outer != "adam" else optax.adam(config.meta_lr)
        exists = run_dir is not None and os.path.exists(os.path.join(run_dir, f"{learner.name}.ckpt.npz"))
        where = None if run_dir is None else RunDir(run_dir, checkpoint_every=config.log_every,
                                                    resume=resume and exists, overwrite=overwrite)
        state = fit(learner, task_distribution(env), optimiser, params, steps=config.steps,
                    meta_batch_size=config.meta_batch_size, key=jax.random.fold_in(jax.random.key(config.seed), 1),
                    run=where,
                    log=Logging(every=config.log_every, progress=progress, stream=stream), stop_at_step=stop_at_step)
        out[method] = state.params
    return out


def evaluate(config: RLConfig, trained: dict[str, Any], run_dir: str | None = None) -> dict:
    """Returns after 0..``eval_steps`` steps on ``eval_tasks`` held-out tasks for every trained policy (mean,
    95% CI); written to ``run_dir``/eval.json and eval.md when given."""
    env, policy, maml, _ = config.parts()
    results = {}
    for method, params in trained.items():
        returns = evaluation.returns_after_steps(maml, env, policy, params, key=10_000 + config.seed,
                                                 num_tasks=config.eval_tasks, num_steps=config.eval_steps,
                                                 eval_episodes=config.eval_episodes)
        results[method] = {**evaluation.summarize(returns), "per_task": returns.tolist()}
    if run_dir is not None:
        with open(os.path.join(run_dir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump({"config": dataclasses.asdict(config), "results": results}, f, indent=2)
        with open(os.path.join(run_dir, "eval.md"), "w", encoding="utf-8") as f:
            f.write(format_table(config.env, results) + "\n")
    return results


def format_table(env_name: str, results: dict) -> str:
    """A Markdown table: average return (± 95% CI) after each number of policy-gradient steps."""
    methods = [m for m in METHODS if m in results]
    steps = len(results[methods[0]]["mean"])
    lines = [f"| {env_name} | " + " | ".join(f"after {s} step{'s' if s != 1 else ''}" for s in range(steps)) + " |",
             "|" + " --- |" * (steps + 1)]
    for method in methods:
        r = results[method]
        lines.append(f"| {method} | " + " | ".join(f"{m:.2f} ± {c:.2f}" for m, c in zip(r["mean"], r["ci95"])) + " |")
    return "\n".join(lines)
