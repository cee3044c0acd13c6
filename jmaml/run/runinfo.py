"""What a run dir holds, read without running anything: ``jmaml inspect RUN_DIR``.

Works on run dirs written by ``jmaml train`` (with ``config.json``) and by ``jmaml.fit`` (only
checkpoints and ``metrics.jsonl``). Nothing here imports the training loop or compiles a program.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

from jmaml.engine import checkpoint

_CKPT_SUFFIX = ".ckpt.npz"


def _v1_names(run_dir: str, phase: str, count: int) -> list[str] | None:
    """Key paths for a version-1 checkpoint (stored by position), recovered from the run's config."""
    try:
        from jmaml.run import recipes, rundir

        names = checkpoint.key_paths(recipes.initial_state(rundir.load_config(run_dir), phase))
    except Exception:  # naming is a courtesy: without a usable config the positions stay
        return None
    return names if len(names) == count else None


def _checkpoint_info(run_dir: str, path: str) -> dict[str, Any]:
    phase = os.path.basename(path)[: -len(_CKPT_SUFFIX)]
    try:
        header, stored = checkpoint.read(path)
    except checkpoint.CheckpointError as e:
        return {"file": os.path.basename(path), "error": str(e)}
    names = list(stored)
    if header["format"] != checkpoint.FORMAT:
        names = _v1_names(run_dir, header.get("extra", {}).get("phase", phase), len(names)) or names
    arrays = [{"key": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in zip(names, stored.values())]
    params = [a for n, a in zip(names, stored.values()) if n.startswith("params/")]
    return {"file": os.path.basename(path), "format": header["format"], "step": header["step"],
            "extra": header.get("extra", {}), "num_arrays": len(arrays),
            "num_params": int(sum(math.prod(a.shape) for a in params)), "arrays": arrays}


def _binding_warning(run_dir: str, ck: dict[str, Any]) -> str | None:
    """Why a checkpoint in a CLI run dir may not be the run's own (another run's fingerprint, phase, data
    or precision; or no fingerprint to check), or None."""
    from jmaml.run import rundir

    try:
        config = rundir.load_config(run_dir)
        file_phase = ck["file"][: -len(_CKPT_SUFFIX)]
        phase = ck["extra"].get("phase", file_phase) if file_phase == "maml" else file_phase
        rundir.check_binding(os.path.join(run_dir, ck["file"]), {"extra": ck["extra"], "step": ck["step"]}, config,
                             phase)
    except (checkpoint.CheckpointError, ValueError, TypeError) as e:
        return str(e)
    if "run" not in ck["extra"]:
        return ("records no run fingerprint (written by jmaml before fingerprints, or edited): not checked to be "
                "this run's")
    return None


def _last_metrics(path: str) -> dict[str, dict[str, Any]]:
    from jmaml.run import rundir

    last: dict[str, dict[str, Any]] = {}
    for record in rundir.read_metrics(path):
        last[record["phase"]] = record
    return last


def inspect_run(run_dir: str) -> dict[str, Any]:
    """A summary of a run dir: its configuration, each checkpoint (step, every array's key path,
    shape and dtype, parameter count), the last metrics record of each phase, and its other files.

    Args:
      run_dir: a folder written by ``jmaml train`` or ``jmaml.fit``.

    Returns:
      A JSON-able dict with keys ``run_dir``, ``config`` (or None), ``versions``, ``checkpoints``,
      ``last_metrics``, ``files``.

    Raises:
      ValueError: ``run_dir`` is not a folder, or holds neither a checkpoint nor a config.json.

    Example:
      >>> import jax.numpy as jnp, tempfile
      >>> run = tempfile.mkdtemp()
      >>> checkpoint.save(f"{run}/maml.ckpt.npz", {"params": [{"w": jnp.ones((1, 4))}]}, step=9)
      >>> info = inspect_run(run)
      >>> info["checkpoints"][0]["step"], info["checkpoints"][0]["arrays"][0]["key"]
      (9, 'params/0/w')
    """
    if not os.path.isdir(run_dir):
        raise ValueError(f"run_dir={run_dir!r} is not a folder")
    files = sorted(os.listdir(run_dir))
    ckpts = sorted(glob.glob(os.path.join(glob.escape(run_dir), "*" + _CKPT_SUFFIX)))
    config_path = os.path.join(run_dir, "config.json")
    if not ckpts and not os.path.exists(config_path):
        raise ValueError(f"{run_dir} is not a jmaml run dir: no config.json and no *{_CKPT_SUFFIX} "
                         f"(it holds {', '.join(files[:8]) or 'nothing'})")
    info: dict[str, Any] = {"run_dir": run_dir, "config": None, "versions": None, "created": None}
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                saved = json.load(f)
            info.update(config=saved.get("config"), versions=saved.get("versions"), created=saved.get("created"))
        except (OSError, ValueError) as e:
            info["config_error"] = f"{config_path}: {e}"
    info["checkpoints"] = [_checkpoint_info(run_dir, p) for p in ckpts]
    for ck in info["checkpoints"]:
        warning = _binding_warning(run_dir, ck) if info["config"] is not None and "error" not in ck else None
        if warning:
            ck["warning"] = warning
    metrics = os.path.join(run_dir, "metrics.jsonl")
    info["last_metrics"] = _last_metrics(metrics) if os.path.exists(metrics) else {}
    info["files"] = files
    return info


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def format_inspection(info: dict[str, Any]) -> str:
    """``inspect_run``'s dict as the text ``jmaml inspect`` prints."""
    lines = [f"run dir: {info['run_dir']}"]
    if info.get("config"):
        c = info["config"]
        keys = [k for k in ("task", "algo", "num_inner_steps", "inner_lr", "meta_lr", "meta_batch_size", "steps",
                            "seed") if k in c]
        lines.append("config: " + ", ".join(f"{k}={_fmt(c[k])}" for k in keys))
    if info.get("versions"):
        lines.append("written with: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
                     + (f" on {info['created']}" if info.get("created") else ""))
    for ck in info["checkpoints"]:
        if "error" in ck:
            lines.append(f"\n{ck['file']}: UNREADABLE: {ck['error']}")
            continue
        lines.append(f"\n{ck['file']}: step {ck['step']}, {ck['num_arrays']} arrays, "
                     f"{ck['num_params']:,} parameters ({ck['format']})")
        if ck.get("warning"):
            lines.append(f"  WARNING: {ck['warning']}")
        width = max(len(a["key"]) for a in ck["arrays"]) if ck["arrays"] else 0
        for a in ck["arrays"]:
            shape = "x".join(map(str, a["shape"])) or "scalar"
            lines.append(f"  {a['key']:<{width}}  {shape:>12}  {a['dtype']}")
    for phase, record in info["last_metrics"].items():
        scalars = ", ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k not in ("phase", "step"))
        lines.append(f"\nlast metrics ({phase}, step {record['step']}): {scalars}")
    lines.append("\nfiles: " + ", ".join(info["files"]))
    return "\n".join(lines)
