"""``jmaml train``: a ``TrainConfig``'s phases trained by the engine (``jmaml.fit``) into a run dir.

The meta-learner (named after its algorithm) and, where the task family has one, the "pretrained"
regression baseline each train to ``config.steps`` with checkpoints, exact resume, interruption and
divergence handling (``jmaml.engine``); the run dir's layout is ``jmaml.rundir``'s. This module only
wires the configuration's registries to the engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from typing import Any, TextIO

import jax
from jax.sharding import Mesh

from jmaml import learners, tasks
from jmaml.core._util import x64_enabled
from jmaml.core.meta import TrainState
from jmaml.engine import _signals, blocking, distributed
from jmaml.engine import loop as engine
from jmaml.engine import writers as writers_mod
from jmaml.engine.loop import DivergenceError, Interrupted, Progress  # noqa: F401 - re-exported
from jmaml.run import recipes, rundir
from jmaml.run.config import BASELINE, OPTIMISERS, TrainConfig  # noqa: F401 - re-exported
from jmaml.run.recipes import (  # noqa: F401 - re-exported
    build_learner,
    build_model,
    build_optimiser,
    effective_unroll,
    initial_state,
    task_stream_key,
)
from jmaml.run.rundir import is_complete, load_config  # noqa: F401 - re-exported

prepare_run_dir = rundir.prepare
_MODES = ("new", "resume", "complete")


def image_preset(task: str, ways: int = 5, shots: int = 1) -> dict[str, Any]:
    """The paper's settings for a few-shot classification family (``TaskFamily.preset``)."""
    family = tasks.family(task)
    if family.preset is None:
        raise ValueError(f"presets exist for {', '.join(n for n, f in tasks.FAMILIES.items() if f.preset)}; "
                         f"got {task!r}")
    return family.preset(ways, shots)


def _phase_name(config: TrainConfig, phase: str) -> str:
    return BASELINE if phase == BASELINE else config.algo


def make_chunk(config: TrainConfig, phase: str = "maml", mesh: Mesh | None = None) -> Callable:
    """The engine's compiled ``chunk(state, length) -> (state, metrics)`` for a config's phase
    (``"pretrained"``, or any other name for the meta-learner)."""
    phase = _phase_name(config, phase)
    learner, dist, optimiser = recipes.phase_parts(config, phase)
    host_loop = _host_loop(config)
    if config.meta_batch_block is not None and phase != BASELINE:
        block = engine.choose_block(config.meta_batch_block, learner, dist, optimiser,
                                    recipes.initial_state(config, phase), config.meta_batch_size, run_dir=None,
                                    name=phase, resume=False, stream=None, mesh=mesh, host_loop=host_loop)
        learner = learner if block is None else blocking.blocked(learner, block, mesh)
    return engine.make_chunk(learner, dist, optimiser, meta_batch_size=config.meta_batch_size, mesh=mesh,
                             host_loop=host_loop)


def _host_loop(config: TrainConfig) -> bool:
    """Whether the family trains with a Python loop over the jitted step here (see ``engine.make_chunk``)."""
    return tasks.family(config.task).host_loop_on_cpu and jax.default_backend() == "cpu"


def _divergence_hint(config: TrainConfig, phase: str) -> str:
    hint = (f"Try a smaller inner rate (now {config.inner_lr}) or meta rate (now {config.meta_lr}) -- from the kept "
            "state: jmaml train --resume --allow-changed-settings with the new rate")
    if phase != BASELINE and any(o.name == "rate_meta_lr" for o in learners.spec(config.algo).options):
        rate = config.options.get("rate_meta_lr")
        hint += (f", or a smaller meta rate for the learned inner rates (rate_meta_lr, now "
                 f"{config.meta_lr if rate is None else rate})")
    return hint


def run_phase(config: TrainConfig, run_dir: str, phase: str, *, resume: bool, stop_at_step: int | None = None,
              stream: TextIO | None = None, mesh: Mesh | None = None, allow: tuple[str, ...] = (),
              writers: Any = None) -> TrainState:
    """Trains one phase to ``config.steps`` with checkpoints (``jmaml.fit``); returns the final state."""
    phase = _phase_name(config, phase)
    learner, dist, optimiser = recipes.phase_parts(config, phase)
    ckpt = os.path.join(run_dir, f"{phase}.ckpt.npz")
    resume = resume and os.path.exists(ckpt)
    try:
        return _fit_phase(config, run_dir, phase, resume=resume, stop_at_step=stop_at_step, stream=stream, mesh=mesh,
                          allow=allow, writers=writers, parts=(learner, dist, optimiser))
    except engine.DivergenceError as e:  # the CLI's advice names its flags
        raise engine.DivergenceError(e.detail, _divergence_hint(config, phase)) from None


def _fit_phase(config: TrainConfig, run_dir: str, phase: str, *, resume: bool, stop_at_step: int | None,
               stream: TextIO | None, mesh: Mesh | None, allow: tuple[str, ...], writers: Any,
               parts: tuple) -> TrainState:
    learner, dist, optimiser = parts
    data = rundir.data_fingerprint(config)
    where = engine.RunDir(run_dir, checkpoint_every=config.checkpoint_every, resume=resume,
                          allow_changed=_allow_changed(allow),
                          fingerprint={"config": rundir.run_fingerprint(config), "data": data},
                          meta={"run": rundir.run_fingerprint(config), "algo": config.algo,
                                "x64": bool(x64_enabled()), "data": data})
    return engine.fit(learner, dist, optimiser, recipes.initial_params(config, phase), steps=config.steps,
                      meta_batch_size=config.meta_batch_size, key=task_stream_key(config, phase), run=where,
                      log=engine.Logging(every=config.log_every, stream=stream, writers=writers), name=phase,
                      max_loss_ratio=config.max_loss_ratio if phase != BASELINE else float("inf"), mesh=mesh,
                      stop_at_step=stop_at_step, host_loop=_host_loop(config),
                      meta_batch_block=config.meta_batch_block if phase != BASELINE else None)


def _allow_changed(allow: tuple[str, ...]) -> bool | tuple[str, ...]:
    """The CLI's deliberate exceptions as the engine's ``allow_changed``: every setting, or the data."""
    if "changed-settings" in allow:
        return True
    return ("settings.data",) if "changed-data" in allow else False


def _adopt_legacy_checkpoint(config: TrainConfig, run_dir: str) -> None:
    """A run dir of the old layout keeps the meta-learner in maml.ckpt.npz whatever the algorithm:
    move it to the algorithm's name before resuming."""
    new = os.path.join(run_dir, f"{config.algo}.ckpt.npz")
    legacy = os.path.join(run_dir, rundir.LEGACY_META_CKPT)
    if new != legacy and not os.path.exists(new) and os.path.exists(legacy):
        os.replace(legacy, new)


def train(config: TrainConfig, run_dir: str, *, resume: bool = False, overwrite: bool = False,
          stop_at_step: int | None = None, stream: TextIO | None = None,
          mesh: Mesh | None = None, allow: tuple[str, ...] = (),
          writers: Any = None) -> dict[str, TrainState]:
    """Meta-trains (and trains the pretrained baseline) into ``run_dir``.

    Args:
      config: the settings (validated here).
      run_dir: the run folder (created if missing).
      resume: continue the run in ``run_dir`` from its checkpoints.
      overwrite: replace a different run in ``run_dir``.
      stop_at_step: stop (with a checkpoint, raising ``Interrupted``) once a phase reaches this
        step: what an interruption does, on purpose (used by the tests).
      stream: where progress goes (default stderr).
      mesh: shard each meta-batch's tasks over this mesh's devices (``jmaml.distributed.task_mesh``);
        None: one device. In a multi-process job (``jmaml.distributed.initialize``) every process
        calls ``train`` with the same arguments; process 0 alone manages and writes the run dir.
      allow: deliberate exceptions on ``resume``: ``"changed-data"`` (the dataset's files changed since
        the checkpoint) and ``"changed-settings"`` (continue the run with other settings, e.g. a smaller
        meta rate after a divergence stop: config.json records the old settings); refused otherwise.
      writers: metric writers given every chunk's record of every phase, beside ``metrics.jsonl``
        (``jmaml.writers``; e.g. ``[TensorBoardWriter(run_dir + "/tensorboard")]``).

    Returns:
      ``{"maml": state, "pretrained": state}``: the meta-learner's state under ``"maml"`` whatever
      the algorithm, and under the algorithm's name too; the baseline's only with ``config.pretrain``.

    Raises:
      ValueError: bad settings or a run dir holding a different run.
      checkpoint.CheckpointError: a corrupted checkpoint on resume (nothing is overwritten).
      DivergenceError, Interrupted: see ``jmaml.fit``.
      distributed.DistributedError: the processes of a distributed job disagree on the settings.
    """
    config.validate()
    if mesh is not None:
        distributed.check_divisible(config.meta_batch_size, mesh)
    distributed.check_same_everywhere("the training settings", json.dumps(
        [config.to_dict(), os.path.abspath(run_dir), resume, overwrite, stop_at_step]))
    writer = distributed.is_writer()
    if writer and os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"output dir {run_dir} exists and is not a folder")
    if writer:  # before the lock file is made: another kind of run's folder is left as it is
        rundir.refuse_other_kind(run_dir, "supervised", "output dir")
    created = not os.path.exists(run_dir)
    with rundir.lock(run_dir, share=True) if writer else contextlib.nullcontext():
        try:
            return _train_locked(config, run_dir, resume=resume, overwrite=overwrite, stop_at_step=stop_at_step,
                                 stream=stream, mesh=mesh, allow=tuple(allow),
                                 writers=writers_mod.check_writers(writers))
        except Exception as e:
            # a refused, misconfigured or out-of-memory new run leaves nothing behind in a folder it created
            if writer and created and not [n for n in os.listdir(run_dir) if n.endswith(".ckpt.npz")]:
                shutil.rmtree(run_dir, ignore_errors=True)
            if "RESOURCE_EXHAUSTED" in str(e):
                raise ValueError(f"out of device memory: {str(e).splitlines()[0][:300]}. Lower the meta-batch size, "
                                 "the inner steps or the widths, or add --remat") from e
            raise


def _train_locked(config: TrainConfig, run_dir: str, *, resume: bool, overwrite: bool, stop_at_step: int | None,
                  stream: TextIO | None, mesh: Mesh | None, allow: tuple[str, ...],
                  writers: list[Any]) -> dict[str, TrainState]:
    writer = distributed.is_writer()
    mode, refusal = "new", None
    if writer:
        try:
            mode = rundir.prepare(config, run_dir, resume=resume, overwrite=overwrite,
                                  change_settings="changed-settings" in allow)
        except ValueError as e:
            refusal = e
    code = distributed.broadcast_int(-1 if refusal else _MODES.index(mode))
    if code < 0:
        if refusal is not None:
            raise refusal
        raise distributed.DistributedError(f"process 0 refused the run dir {run_dir} (its error says why)")
    mode = _MODES[code]
    if writer:
        rundir.clean_stale_temporaries(run_dir)
    if writer and mode != "new":  # check every checkpoint before writing anything
        _adopt_legacy_checkpoint(config, run_dir)
        keep = {}
        for phase in (config.algo, BASELINE):
            ckpt = os.path.join(run_dir, f"{phase}.ckpt.npz")
            if os.path.exists(ckpt):
                _, header = rundir.restore_phase(run_dir, config, phase, initial_state(config, phase),
                                                 allow=allow)
                keep[phase] = header["step"]
        if mode == "resume":
            if config.algo not in keep:
                raise ValueError(f"--resume: {run_dir} holds no checkpoint of its {config.algo} phase (the run "
                                 "stopped before its first one); start it over with --overwrite")
            if keep.get(config.algo, 0) < config.steps:
                keep.pop(BASELINE, None)
            rundir.trim_metrics(os.path.join(run_dir, "metrics.jsonl"), keep)
    states = {}
    # one flag over both phases (the CLI's, installed before JAX, when there is one): a signal between
    # them is not lost
    active = _signals.active()
    with contextlib.nullcontext(active) if active is not None else engine.StopFlag():
        for phase in config.phases():
            states[phase] = run_phase(config, run_dir, phase, resume=mode != "new", stop_at_step=stop_at_step,
                                      stream=stream, mesh=mesh, allow=allow, writers=writers)
    states["maml"] = states[config.algo]
    return states


def load_params(run_dir: str, phase: str = "maml") -> Any:
    """The trained (meta-)parameters of a phase from a run dir's checkpoint (``"pretrained"``, or any
    other name for the meta-learner)."""
    config = load_config(run_dir)
    phase = _phase_name(config, phase)
    state, _ = rundir.restore_phase(run_dir, config, phase, initial_state(config, phase))
    return state.params
