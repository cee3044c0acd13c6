"""The run dir of a ``jmaml train`` run::

    config.json          the TrainConfig, the algorithm's resolved settings, versions, when it was made
    metrics.jsonl        one line per chunk of steps: phase, step, every metric the learner reports, steps/s
    ALGO.ckpt.npz        the meta-learner's whole state (meta-parameters, optimiser state, step, key),
                         named after its algorithm (``maml.ckpt.npz``, ``reptile.ckpt.npz`` ...)
    pretrained.ckpt.npz  the "pretrained" baseline: the same network trained by plain regression
    eval.json, eval.md   the evaluation (``jmaml eval``)

Run dirs written before checkpoints were named after the algorithm hold ``maml.ckpt.npz`` for every
algorithm; they still load (and resume into the new name).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any

import jax
import optax

from jmaml import checkpoint
from jmaml.config import TrainConfig

LEGACY_META_CKPT = "maml.ckpt.npz"


def checkpoint_path(run_dir: str, phase: str) -> str:
    """The checkpoint file of a phase; for a run dir of the old layout, its ``maml.ckpt.npz``."""
    path = os.path.join(run_dir, f"{phase}.ckpt.npz")
    legacy = os.path.join(run_dir, LEGACY_META_CKPT)
    if not os.path.exists(path) and phase != "pretrained" and os.path.exists(legacy):
        return legacy
    return path


def run_info(config: TrainConfig) -> dict[str, Any]:
    return {"config": config.to_dict(), "task": config.task, "algorithm": config.algorithm_settings(),
            "versions": {"jax": jax.__version__, "optax": optax.__version__, "python": sys.version.split()[0]},
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def load_config(run_dir: str) -> TrainConfig:
    """The TrainConfig saved in a run dir."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir} is not a jmaml run dir: no config.json")
    with open(path, encoding="utf-8") as f:
        return TrainConfig.from_dict(json.load(f)["config"])


def is_complete(run_dir: str, config: TrainConfig) -> bool:
    """Whether every phase of the run in ``run_dir`` has reached ``config.steps``."""
    for phase in config.phases():
        ckpt = checkpoint_path(run_dir, phase)
        if not os.path.exists(ckpt) or checkpoint.read_header(ckpt)["step"] < config.steps:
            return False
    return True


def trim_metrics(path: str, keep_steps: dict[str, int]) -> None:
    """Drops metrics lines past each phase's checkpointed step (they will be recomputed)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in lines if r["step"] <= keep_steps.get(r["phase"], 0)]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


def prepare(config: TrainConfig, run_dir: str, *, resume: bool = False, overwrite: bool = False) -> str:
    """Creates or checks ``run_dir``; returns ``"new"``, ``"resume"`` or ``"complete"``.

    Raises:
      ValueError: if ``run_dir`` holds a different run (and neither ``resume`` with the same
        settings nor ``overwrite`` was asked for), or is not a folder.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"output dir {run_dir} exists and is not a folder")
    existing = os.path.exists(cfg_path)
    if existing and overwrite:
        for name in os.listdir(run_dir):
            if name in ("config.json", "metrics.jsonl", "eval.json", "eval.md") or name.endswith(".ckpt.npz"):
                os.remove(os.path.join(run_dir, name))
        existing = False
    if existing:
        old = load_config(run_dir)
        diff = {k: (v, config.to_dict()[k]) for k, v in old.to_dict().items()
                if k != "steps" and v != config.to_dict()[k]}
        if diff:
            changes = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in diff.items())
            raise ValueError(f"output dir {run_dir} already holds a different run ({changes}). "
                             "Use --overwrite to replace it, or choose another --out.")
        if old.steps != config.steps and not resume:
            raise ValueError(f"output dir {run_dir} holds a run of {old.steps} steps; to train it to "
                             f"{config.steps} steps pass --resume, or use --overwrite / another --out.")
        if not resume and not is_complete(run_dir, old):
            raise ValueError(f"output dir {run_dir} holds an unfinished run with these settings. "
                             "Continue it with --resume, or start over with --overwrite.")
        if not resume:
            return "complete"  # an unfinished run without --resume was refused above
        if old.steps != config.steps:
            write_info(config, run_dir)
        return "complete" if is_complete(run_dir, config) else "resume"
    if resume and os.path.isdir(run_dir) and os.listdir(run_dir):
        raise ValueError(f"--resume: {run_dir} holds no jmaml run (no config.json)")
    os.makedirs(run_dir, exist_ok=True)
    if os.listdir(run_dir) and not overwrite:
        raise ValueError(f"output dir {run_dir} is not empty and holds no jmaml run; "
                         "choose an empty or new folder")
    write_info(config, run_dir)
    return "new"


def write_info(config: TrainConfig, run_dir: str) -> None:
    with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(run_info(config), f, indent=2)
