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

import contextlib
import datetime
import hashlib
import json
import os
import sys
from typing import Any

import jax
import optax

from jmaml.core._util import x64_enabled
from jmaml.engine import checkpoint
from jmaml.engine.runstore import (  # noqa: F401
    LOCK_FILE,
    atomic_write_text,
    checkpoints_beyond,
    clean_stale_temporaries,
    lock,
    read_metrics,
    refuse_other_kind,
    trim_metrics,
)
from jmaml.run.config import TrainConfig

LEGACY_META_CKPT = "maml.ckpt.npz"
# What --overwrite replaces; a folder whose config.json is not a jmaml run's is never touched.
RUN_FILES = ("config.json", "metrics.jsonl", "eval.json", "eval.md")
PLOTS_DIR = "plots"
FITS_PNG, CURVES_PNG = "fits.png", "curves.png"
PLOT_FILES = (FITS_PNG, CURVES_PNG)  # what ``jmaml.plot`` writes into PLOTS_DIR


# Fields added to TrainConfig after runs were written, with the value every older run implicitly had.
_LATER_FIELDS = {"backbone": "conv4", "precision": "float32", "meta_batch_block": None}


# Fields added without an entry above, so runs written before them were fingerprinted without them and
# runs written since with them: both forms are accepted on resume (``known_fingerprints``).
_UNLISTED_LATER_FIELDS = {"cache_dir": None}


def _fingerprint(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprinted(config: TrainConfig) -> dict[str, Any]:
    """The settings a run's fingerprint hashes: all but its length, later fields at their old default left out."""
    d = config.to_dict()
    d.pop("steps")
    for name, default in _LATER_FIELDS.items():  # a run written before the field existed keeps its fingerprint
        if d.get(name) == default:
            d.pop(name)
    return d


def run_fingerprint(config: TrainConfig) -> str:
    """A hash of the settings that make a run what it is (all but its length, which may grow on
    resume): recorded in its checkpoints, so a checkpoint of another run is refused."""
    return _fingerprint(_fingerprinted(config))


def known_fingerprints(config: TrainConfig) -> set[str]:
    """The fingerprints a checkpoint of this run may carry: ``run_fingerprint``, and the forms of jmaml
    versions that did not yet have the fields of ``_UNLISTED_LATER_FIELDS`` (at their defaults)."""
    d = _fingerprinted(config)
    out = {_fingerprint(d)}
    if all(d.get(name) == default for name, default in _UNLISTED_LATER_FIELDS.items()):
        out.add(_fingerprint({k: v for k, v in d.items() if k not in _UNLISTED_LATER_FIELDS}))
    return out


def _read_info(run_dir: str) -> dict | None:
    """config.json's content when it is a jmaml run's (a dict with "config" and "versions"), else None."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(info, dict) and isinstance(info.get("config"), dict) and "versions" in info:
        return info
    return None


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
    """The TrainConfig saved in a run dir.

    Raises:
      ValueError: no config.json, or one that is not a jmaml run's or holds invalid settings (naming
        the file).
    """
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir} is not a jmaml run dir: no config.json")
    info = _read_info(run_dir)
    if info is None:
        raise ValueError(f"{path} is not a jmaml run's config.json (unreadable, or without its \"config\" and "
                         "\"versions\" entries)")
    try:
        return TrainConfig.from_dict(info["config"]).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def is_complete(run_dir: str, config: TrainConfig) -> bool:
    """Whether every phase of the run in ``run_dir`` has reached ``config.steps``."""
    for phase in config.phases():
        ckpt = checkpoint_path(run_dir, phase)
        if not os.path.exists(ckpt) or checkpoint.read_header(ckpt)["step"] < config.steps:
            return False
    return True


def prepare(config: TrainConfig, run_dir: str, *, resume: bool = False, overwrite: bool = False,
            change_settings: bool = False) -> str:
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
    refuse_other_kind(run_dir, "supervised", "output dir")
    existing = os.path.exists(cfg_path)
    if existing and _read_info(run_dir) is None:
        doomed = sorted(n for n in os.listdir(run_dir) if n in RUN_FILES or n.endswith(".ckpt.npz"))
        raise ValueError(f"output dir {run_dir} holds a config.json that is not a jmaml run's; jmaml will not "
                         f"{'overwrite' if overwrite else 'use'} it (--overwrite would replace {', '.join(doomed)}). "
                         "Choose another --out.")
    if resume and not existing:
        raise ValueError(f"--resume: {run_dir} holds no jmaml run to resume (no config.json); "
                         "leave out --resume to start a new run there")
    replaced = existing and overwrite
    if replaced:  # the run's own files go, its plots included; anything else in the folder stays
        for name in os.listdir(run_dir):
            if name in RUN_FILES or name.endswith(".ckpt.npz") or ".tmp-" in name:
                os.remove(os.path.join(run_dir, name))
        plots = os.path.join(run_dir, PLOTS_DIR)
        for name in PLOT_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(plots, name))
        with contextlib.suppress(OSError):
            os.rmdir(plots)  # only when empty
        existing = False
    if existing:
        old = load_config(run_dir)
        diff = {k: (v, config.to_dict()[k]) for k, v in old.to_dict().items()
                if k != "steps" and v != config.to_dict()[k]}
        if diff and resume and change_settings:  # deliberate: continue this run's state with other settings
            info = run_info(config)
            previous = _read_info(run_dir) or {}
            info["changes"] = [*previous.get("changes", []), {"from": {k: a for k, (a, _) in diff.items()},
                                                              "to": {k: b for k, (_, b) in diff.items()},
                                                              "at": info["created"]}]
            atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(info, indent=2))
            return "resume"
        if diff:
            changes = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in diff.items())
            raise ValueError(f"output dir {run_dir} already holds a different run ({changes}). To continue its state "
                             "with these settings on purpose (e.g. a smaller rate after a divergence stop), add "
                             "--resume --allow-changed-settings; to start over, --overwrite (its checkpoints are "
                             "deleted); or choose another --out.")
        if old.steps != config.steps and not resume:
            raise ValueError(f"output dir {run_dir} holds a run of {old.steps} steps; to train it to "
                             f"{config.steps} steps pass --resume, or use --overwrite / another --out.")
        if not resume and not is_complete(run_dir, old):
            raise ValueError(f"output dir {run_dir} holds an unfinished run with these settings. "
                             "Continue it with --resume, or start over with --overwrite.")
        if not resume:
            return "complete"  # an unfinished run without --resume was refused above
        if old.steps != config.steps:
            beyond = checkpoints_beyond(run_dir, config.steps)
            if beyond:
                raise ValueError(f"--resume --steps {config.steps}: {run_dir} holds checkpoints at steps {beyond}; a "
                                 "run cannot be shortened (evaluate it as it is, or use another --out)")
            write_info(config, run_dir)
        return "complete" if is_complete(run_dir, config) else "resume"
    os.makedirs(run_dir, exist_ok=True)
    others = sorted(n for n in os.listdir(run_dir) if n != LOCK_FILE)
    if others and not replaced:  # --overwrite replaces a jmaml run; a folder that holds none is never written into
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ValueError(f"output dir {run_dir} is not empty and holds no jmaml run (no config.json; it holds "
                         f"{shown}){'; --overwrite replaces only a jmaml run' if overwrite else ''}: choose an "
                         "empty or new folder")
    write_info(config, run_dir)
    return "new"


def write_info(config: TrainConfig, run_dir: str) -> None:
    atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(run_info(config), indent=2))


def restore_phase(run_dir: str, config: TrainConfig, phase: str, template: Any, *,
                  allow: tuple[str, ...] = ()) -> tuple[Any, dict]:
    """A phase's checkpoint, checked to belong to this run and phase (its header's ``phase`` and run
    fingerprint, where it records them: checkpoints of older versions do not)."""
    path = checkpoint_path(run_dir, phase)
    return checkpoint.restore(path, template, check=lambda header: check_binding(
        path, header, config, phase, allow=allow))


def data_fingerprint(config: TrainConfig) -> str | None:
    """The fingerprint of the data a run trains on (for families that read datasets), else None."""
    from jmaml import tasks

    family = tasks.family(config.task)
    return family.fingerprint(config) if family.fingerprint is not None else None


def check_binding(path: str, header: dict, config: TrainConfig, phase: str, *, allow: tuple[str, ...] = ()) -> None:
    """Raises CheckpointError if a checkpoint's header names another phase, another run, another
    precision or other data, except what ``allow`` permits ("changed-data", "changed-settings")."""
    extra = header.get("extra", {})
    if extra.get("data") is not None and "changed-data" not in allow and extra["data"] != data_fingerprint(config):
        raise checkpoint.CheckpointError(f"checkpoint {path} was trained on other data than {config.data_dir} holds "
                                         "now (its files changed): restore the data it was trained on to evaluate "
                                         "it; to continue training on the changed data on purpose, jmaml train "
                                         "--resume --allow-changed-data")
    want_phase = {phase, "maml"} if os.path.basename(path) == LEGACY_META_CKPT else {phase}
    if "phase" in extra and extra["phase"] not in want_phase:
        raise checkpoint.CheckpointError(f"checkpoint {path} holds phase {extra['phase']!r}, not {phase!r}: it "
                                         "was copied or renamed from another file; nothing was overwritten")
    if "x64" in extra and extra["x64"] != bool(x64_enabled()):
        raise checkpoint.CheckpointError(f"checkpoint {path} was written with jax_enable_x64={extra['x64']}, and "
                                         f"this process runs with {bool(x64_enabled())}: resume it with "
                                         "the same precision")
    if "run" in extra and "changed-settings" not in allow and extra["run"] not in known_fingerprints(config):
        raise checkpoint.CheckpointError(f"checkpoint {path} belongs to another run (fingerprint {extra['run']}, "
                                         f"this run's {run_fingerprint(config)}: other settings or seed); "
                                         "nothing was overwritten")
