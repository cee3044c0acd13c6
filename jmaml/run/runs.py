"""The registry of recipes: every kind of run jmaml's commands start.

A recipe is a config dataclass (its fields declare the command-line flags, ``jmaml.flags``; ``validate``
checks them) plus how to train it into a run folder, how to evaluate and report a finished run, and how to
sweep it. Supervised meta-learning (sinusoids, few-shot images: ``TrainConfig``) and meta-RL (``RLConfig``)
are the two entries; ``jmaml train``, ``jmaml rl`` and ``jmaml sweep`` are made from them. A run folder
records its config (``config_file``): that record is the run, which ``--resume`` continues, and a folder
holding one recipe's run is never resumed, overwritten or swept into by another's.

The entries import their recipe's modules only when called, so reading the registry costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from jmaml import tasks
from jmaml.engine.runstore import refuse_other_kind
from jmaml.run.config import TrainConfig
from jmaml.run.rl_recipe import CONFIG_FILE as RL_CONFIG_FILE
from jmaml.run.rl_recipe import RL_ENVS, RLConfig


class Recipe(NamedTuple):
    """One kind of run. ``name``: the registry key; ``command``: the ``jmaml`` command that runs it;
    ``config``: its config class; ``task_field``: the config field naming the task (``task``, ``env``) and
    ``tasks`` its choices; ``config_file``: what a run folder records it in. The callables:
    ``load_config(run_dir)``, ``train(config, run_dir, resume=, overwrite=, **kw)``,
    ``evaluate(config, run_dir, **kw)`` (scores a finished run and writes its results: ``eval.json``, and
    for RL ``name=`` another protocol's file beside it),
    ``format_table(config, results)`` and ``sweep(config, grid, run_dir, **kw)``."""

    name: str
    command: str
    config: type
    task_field: str
    tasks: tuple[str, ...]
    config_file: str
    load_config: Callable[[str], Any]
    train: Callable[..., Any]
    evaluate: Callable[..., Any]
    format_table: Callable[[Any, Any], str]
    sweep: Callable[..., Any]

    def refuse_other_runs(self, run_dir: str, flag: str = "--out") -> None:
        """Raises ValueError when ``run_dir`` holds another recipe's run or a sweep."""
        refuse_other_kind(run_dir, self.name, flag)


def _supervised_load(run_dir: str) -> TrainConfig:
    from jmaml.run.rundir import load_config

    return load_config(run_dir)


def _supervised_train(config: TrainConfig, run_dir: str, **kw: Any) -> Any:
    from jmaml.run.train import train

    return train(config, run_dir, **kw)


def _supervised_evaluate(config: TrainConfig, run_dir: str, **kw: Any) -> Any:
    from jmaml.run.evaluate import evaluate_run

    return evaluate_run(run_dir, **kw)


def _supervised_table(config: TrainConfig, results: Any) -> str:
    from jmaml.run.evaluate import format_table

    return format_table(results)


def _supervised_sweep(config: TrainConfig, grid: Any, run_dir: str | None = None, **kw: Any) -> Any:
    from jmaml.run.sweep import run_sweep

    return run_sweep(config, grid, run_dir=run_dir, **kw)


def _rl_load(run_dir: str) -> RLConfig:
    from jmaml.run.rl_recipe import load_config

    return load_config(run_dir)


def _rl_train(config: RLConfig, run_dir: str, **kw: Any) -> Any:
    from jmaml.run.rl_recipe import train

    return train(config, run_dir, **kw)


def _rl_evaluate(config: RLConfig, run_dir: str, **kw: Any) -> Any:
    from jmaml.run.rl_recipe import evaluate, load_trained

    return evaluate(config, load_trained(config, run_dir), run_dir, **kw)


def _rl_table(config: RLConfig, results: Any) -> str:
    from jmaml.run.rl_recipe import format_table

    return format_table(config.env, results)


def _rl_sweep(config: RLConfig, grid: Any, run_dir: str | None = None, **kw: Any) -> Any:
    from jmaml.run.rl_recipe import sweep

    return sweep(config, grid, run_dir, **kw)


RECIPES: dict[str, Recipe] = {
    "supervised": Recipe("supervised", "train", TrainConfig, "task", tuple(tasks.FAMILIES), "config.json",
                         _supervised_load, _supervised_train, _supervised_evaluate, _supervised_table,
                         _supervised_sweep),
    "rl": Recipe("rl", "rl", RLConfig, "env", RL_ENVS, RL_CONFIG_FILE, _rl_load, _rl_train,
                 _rl_evaluate, _rl_table, _rl_sweep),
}


def for_task(task: str) -> Recipe:
    """The recipe whose task choices hold ``task`` (ValueError naming every task otherwise)."""
    for recipe in RECIPES.values():
        if task in recipe.tasks:
            return recipe
    known = [t for r in RECIPES.values() for t in r.tasks]
    raise ValueError(f"task must be one of {known}, got {task!r}")


def all_tasks() -> tuple[str, ...]:
    """Every task of every recipe, supervised first."""
    return tuple(t for r in RECIPES.values() for t in r.tasks)

