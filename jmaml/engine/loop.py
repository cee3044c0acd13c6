"""The engine: meta-trains any ``MetaLearner`` on any ``TaskDistribution`` with any optax optimiser.

``fit`` runs steps in *chunks* of ``Logging.every`` steps: one jitted ``lax.scan`` samples the tasks
on the device and applies them; metrics come back to the host once per chunk. Chunks are aligned to
multiples of that length from step 0, so a run that is interrupted and resumed
executes exactly the same programs on exactly the same states and keys as one that is not: the
final parameters are bitwise equal on one machine.

With a run folder (``RunDir``) it keeps ``NAME.ckpt.npz`` (the whole state: meta-parameters, optimiser state,
step, key) and appends to ``metrics.jsonl`` every scalar the learner reports, one line per chunk.
SIGINT/SIGTERM stop it between chunks with a checkpoint; a non-finite or exploding meta-loss stops
it with the last good state kept. The engine never asks which task, model or algorithm it runs.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jmaml.core import protocols
from jmaml.core._checks import check_max_loss_ratio, check_positive_int, check_task_batch_tree
from jmaml.core.meta import TrainState, init_state, make_estimator_step
from jmaml.core.protocols import REQUIRED_METRICS, MetaLearner, TaskDistribution
from jmaml.core.types import Params, PRNGKey
from jmaml.engine import _signals, blocking, checkpoint, distributed, runstore
from jmaml.engine import fingerprint as fp
from jmaml.engine import writers as writers_mod
from jmaml.engine._signals import StopFlag  # noqa: F401 - part of the engine's API


class DivergenceError(RuntimeError):
    """Meta-training produced a non-finite loss or gradient, or an exploding inner loop.

    ``str(error)`` is what happened and where the last good state is, then advice (by default: smaller
    rates); a caller with better advice (the CLI names its flags) re-raises with ``error.detail`` and its own.

    Attributes:
      detail: what happened and where the last good state is, without the advice.
      state: the state as training stopped, where the raiser keeps it (a population whose every
        point diverged), else None.
    """

    state: Any = None
    ADVICE = "Try a smaller inner rate or meta rate"

    def __init__(self, detail: str, advice: str | None = None):
        self.detail = detail
        super().__init__(f"{detail}. {advice or self.ADVICE}.")


class Interrupted(Exception):  # noqa: N818 - it is a control-flow signal, not an error
    """Training stopped on request (signal or ``stop_at_step``) after writing a checkpoint."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


# ---- checks ----------------------------------------------------------------------------------

def check_learner(learner: Any) -> MetaLearner:
    """A ``MetaLearner`` or a clear TypeError."""
    if not isinstance(learner, MetaLearner):
        raise TypeError("learner must be a jmaml.MetaLearner(init, estimate, adapt, ...), got "
                        f"{type(learner).__name__}")
    for field in ("init", "estimate", "adapt"):
        if not callable(getattr(learner, field)):
            raise TypeError(f"learner.{field} must be a function, got {getattr(learner, field)!r}")
    return learner


def check_distribution(tasks: Any) -> TaskDistribution:
    """A ``TaskDistribution`` or a clear TypeError."""
    if not isinstance(tasks, TaskDistribution):
        raise TypeError(f"tasks must be a jmaml.TaskDistribution(sample, ...), got {type(tasks).__name__}")
    if not callable(tasks.sample):
        raise TypeError(f"tasks.sample must be a function sample(key, num_tasks), got {tasks.sample!r}")
    return tasks


def sample_tasks(tasks: TaskDistribution, key: PRNGKey, num_tasks: int, data: Any = None) -> Any:
    """``tasks.sample`` (with its data, when it has one), checked to have a leading task axis of
    ``num_tasks`` on every leaf and, where the distribution states them, its per-task shapes."""
    batch = tasks.sample(key, num_tasks) if data is None else tasks.sample(key, num_tasks, data)
    check_task_batch_tree(batch, f"{tasks.name} sampler's tasks", num_tasks=num_tasks, task_shapes=tasks.task_shapes)
    return batch


def check_metrics(metrics: Any, learner: MetaLearner, num_tasks: int) -> None:
    """At trace time: the learner's metrics hold ``REQUIRED_METRICS`` with the right shapes."""
    if not isinstance(metrics, dict):
        raise TypeError(f"learner {learner.name!r}: estimate must return (loss, grads, metrics) with metrics a "
                        f"dict, got {type(metrics).__name__}")
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        raise ValueError(f"learner {learner.name!r}: its metrics lack {missing}; every learner reports "
                         f"{list(REQUIRED_METRICS)} (task_losses: each task's query loss, shape (num_tasks,); "
                         "pre_adapt_loss: the query loss before adaptation, a scalar), which the divergence "
                         "check reads")
    if jnp.shape(metrics["task_losses"]) != (num_tasks,):
        raise ValueError(f"learner {learner.name!r}: metrics['task_losses'] must have shape ({num_tasks},), one "
                         f"loss per task, got {jnp.shape(metrics['task_losses'])}")
    if jnp.shape(metrics["pre_adapt_loss"]) != ():
        raise ValueError(f"learner {learner.name!r}: metrics['pre_adapt_loss'] must be a scalar, got shape "
                         f"{jnp.shape(metrics['pre_adapt_loss'])}")


# ---- the step and the chunk ----------------------------------------------------------------

def make_learner_step(learner: MetaLearner, optimiser: optax.GradientTransformation, **hyper: Any):
    """A pure ``step(state, tasks, **hyper) -> (state, metrics)`` for a learner (see
    ``jmaml.make_estimator_step``); metrics are the learner's plus ``meta_loss`` and ``grad_norm``."""
    check_learner(learner)

    def estimate(meta_params, tasks, meta_step=None, **kw):
        out = learner.estimate(meta_params, tasks, meta_step, **kw)
        if not isinstance(out, tuple) or len(out) != (4 if "model_state" in kw else 3):
            what = "(loss, grads, metrics, new_model_state) for a model with state" if "model_state" in kw else \
                "(loss, grads, metrics)"
            raise TypeError(f"learner {learner.name!r}: estimate must return {what}")
        check_metrics(out[2], learner, jax.tree.leaves(tasks)[0].shape[0])
        return out

    return make_estimator_step(optimiser, estimate, **hyper)


def initial_state(learner: MetaLearner, params: Params, optimiser: optax.GradientTransformation,
                  key: PRNGKey, model_state: Any = None) -> TrainState:
    """The step-0 state: the learner's meta-parameters for ``params``, the optimiser's state, the
    key the training tasks are drawn from, and a model's state (None for a stateless model)."""
    return init_state(learner.init(params), optimiser, key, model_state)


def make_sampled_step(learner: MetaLearner, tasks: TaskDistribution, optimiser: optax.GradientTransformation, *,
                      meta_batch_size: int, mesh: Mesh | None = None) -> Callable:
    """One step of a chunk, ``one(state, data) -> (state, metrics)``: splits the state's key, samples a
    meta-batch on the device (sharded over ``mesh``'s task axis) and applies one meta-step."""
    step = make_learner_step(learner, optimiser)

    def one(state: TrainState, data: Any):
        key, key_tasks = jax.random.split(state.key)
        batch = distributed.shard_tasks(sample_tasks(tasks, key_tasks, meta_batch_size, data), mesh)
        new_state, metrics = step(state._replace(key=key), batch)
        return distributed.replicate(new_state, mesh), distributed.replicate(metrics, mesh)

    return one


_CHUNKS: collections.OrderedDict = collections.OrderedDict()


def make_chunk(learner: MetaLearner, tasks: TaskDistribution, optimiser: optax.GradientTransformation, *,
               meta_batch_size: int, mesh: Mesh | None = None, host_loop: bool = False) -> Callable:
    """A ``chunk(state, length) -> (state, metrics)`` running ``length`` meta-steps.

    Each step splits the state's key, samples a meta-batch on the device and applies one meta-step.
    With a ``mesh`` (``jmaml.distributed.task_mesh``) the meta-batch is sharded over its devices'
    task axis and the state stays replicated; XLA derives the cross-device reduction of the
    meta-gradient from those shardings. ``host_loop`` runs the steps as a Python loop over one jitted
    step instead of a compiled scan (XLA's CPU backend runs convolutions inside a compiled loop about
    3x slower than alone). Cached on its arguments, so resuming in one process reuses the compilation.
    """
    cache_key = (learner.estimate, tasks.sample, id(tasks.data), optimiser, meta_batch_size, mesh, host_loop)
    if cache_key in _CHUNKS:
        _CHUNKS.move_to_end(cache_key)
        return _CHUNKS[cache_key]
    one = make_sampled_step(learner, tasks, optimiser, meta_batch_size=meta_batch_size, mesh=mesh)
    data = tasks.data
    if data is not None:
        data = distributed.put_replicated(data, mesh)
    if host_loop:
        one_jit = jax.jit(one)

        def chunk(state: TrainState, length: int):
            metrics = []
            for _ in range(length):
                state, m = one_jit(state, data)
                metrics.append(m)
            return state, jax.tree.map(lambda *a: jnp.stack(a), *metrics)
    else:
        @jax.jit
        def _chunk(state: TrainState, length_marker: jax.Array, data):
            # data is closed over by the step (a loop invariant), not carried from step to step
            return jax.lax.scan(lambda s, _: one(s, data), state, None, length=length_marker.shape[0])

        # The length is carried by an argument's shape so jit specialises on it without retracing the
        # Python function for every call; data is an argument, not a constant baked into the program.
        # Each length is compiled ahead of time once, so its memory need is known before it runs.
        executables: dict[int, Any] = {}

        def chunk(state: TrainState, length: int):
            marker = jnp.zeros((length,), jnp.int8)
            if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(state)):
                return _chunk(state, marker, data)  # traced by an outer jit: nothing to compile here
            if length not in executables:
                executables[length] = _chunk.lower(state, marker, data).compile()
                check_memory(executables[length], f"a chunk of {length} meta-steps of {learner.name!r}")
            return executables[length](state, marker, data)

    _CHUNKS[cache_key] = chunk
    while len(_CHUNKS) > 16:
        _CHUNKS.popitem(last=False)
    return chunk


def device_memory_bytes() -> int:
    """Memory of the default device: the accelerator's limit, or the host's RAM for the CPU."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:  # noqa: BLE001 - some backends do not implement memory_stats
        pass
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_memory(compiled: Any, what: str, fraction: float = 0.95) -> None:
    """Raises ValueError, before anything runs, when a compiled program needs more device memory than
    there is (XLA's own memory analysis: arguments, outputs and temporaries)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without memory analysis: nothing to check
        return
    if stats is None:
        return
    need = sum(int(getattr(stats, name, 0) or 0) for name in ("argument_size_in_bytes", "output_size_in_bytes",
                                                             "temp_size_in_bytes", "generated_code_size_in_bytes"))
    have = device_memory_bytes()
    if need > fraction * have:
        raise ValueError(f"{what} needs about {need / 2**30:.1f} GiB of device memory, more than the "
                         f"{have / 2**30:.1f} GiB there is: lower the meta-batch size, the inner steps or the model's "
                         "size, or rematerialise the inner loop (remat)")


# ---- progress, signals, metrics files --------------------------------------------------------

class Progress:
    """A one-line progress bar on a terminal; plain, throttled log lines otherwise."""

    def __init__(self, label: str, total: int, start: int, stream: TextIO | None = None,
                 every_s: float = 5.0):
        self.label, self.total, self.start = label, total, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last_line = -math.inf
        self.every_s = every_s

    def update(self, step: int, loss: float, steps_per_s: float, final: bool = False) -> None:
        done = step - self.start
        left = self.total - step
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else steps_per_s
        eta = str(datetime.timedelta(seconds=round(left / rate))) if rate > 0 else "?"
        frac = step / self.total
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"  # a slow run (meta-RL, images): not "0 steps/s"
        text = (f"{self.label} {step}/{self.total} ({100 * frac:.0f}%) | {shown} steps/s | "
                f"meta-loss {loss:.4f} | ETA {eta}")
        if self.tty:
            width = 24
            bar = "#" * int(width * frac) + "." * (width - int(width * frac))
            self.stream.write(f"\r[{bar}] {text}\x1b[K" + ("\n" if final else ""))
            self.stream.flush()
        elif final or time.perf_counter() - self.last_line >= self.every_s:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last_line = time.perf_counter()


def diverged_steps(metrics: Mapping[str, Any], max_loss_ratio: float, xp: Any = np) -> Any:
    """The one divergence rule, for a run's steps (``fit``) and a population's points
    (``fit_population``) alike: a step diverged when its meta-loss, gradient norm, un-adapted loss or any
    task's loss is not finite, or when its adapted loss passes ``max_loss_ratio`` times its un-adapted
    loss (an exploding inner loop, the seed's -1515.48 at scale). The ratio is a scale only for an
    un-adapted loss that is not negative (minus a return can be either sign: there only non-finite values
    count).

    Per step, not per chunk: a run and the same run as a population point stop at the same step, and the
    state kept is the one before that step whatever the chunk length (``log_every``) -- a chunk mean would
    let one exploding step through beside good ones, and make the outcome depend on how often the run logs.

    Args:
      metrics: the learner's metrics with any leading axes (a chunk's steps, a population's points);
        ``task_losses`` has the tasks behind them.
      xp: ``numpy`` on the host, ``jax.numpy`` inside a compiled step.

    Returns:
      A boolean array of the leading shape: True where the step diverged.
    """
    loss, gnorm, pre = metrics["meta_loss"], metrics["grad_norm"], metrics["pre_adapt_loss"]
    tasks = xp.reshape(metrics["task_losses"], (*xp.shape(loss), -1))
    finite = xp.isfinite(loss) & xp.isfinite(gnorm) & xp.isfinite(pre) & xp.all(xp.isfinite(tasks), axis=-1)
    with np.errstate(all="ignore"):  # a float32 ratio past its range is an explosion, not a warning
        exploding = (pre >= 0) & (loss > max_loss_ratio * xp.maximum(pre, 1e-30))
    return ~finite | exploding


def divergence(step0: int, metrics: dict[str, np.ndarray], max_loss_ratio: float) -> str | None:
    """Describes the first diverged step of a chunk (``diverged_steps``), naming the step and tasks, or
    None when no step diverged."""
    bad = np.asarray(diverged_steps(metrics, max_loss_ratio))
    return describe_divergence(step0, int(np.argmax(bad)), metrics, max_loss_ratio) if bad.any() else None


def describe_divergence(step0: int, i: int, metrics: dict[str, np.ndarray], max_loss_ratio: float) -> str:
    """What went wrong at step ``i`` of a chunk starting after ``step0``: the non-finite values and tasks, or
    the explosion's ratio and worst tasks."""
    loss, gnorm, pre = (float(np.asarray(metrics[k])[i]) for k in ("meta_loss", "grad_norm", "pre_adapt_loss"))
    task_losses = np.asarray(metrics["task_losses"])[i].reshape(-1)
    if not (np.isfinite([loss, gnorm, pre]).all() and np.isfinite(task_losses).all()):
        tasks = np.flatnonzero(~np.isfinite(task_losses)).tolist()
        which = f"tasks {tasks} of the meta-batch" if tasks else "the meta-gradient"
        own = [k for k, v in metrics.items()  # the learner's own metrics name the cause (a return, a reward ...)
               if k not in ("meta_loss", "grad_norm", "pre_adapt_loss", "task_losses")
               and np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(np.asarray(v)[i]))]
        also = f"; the learner's metrics non-finite there: {', '.join(sorted(own))}" if own else ""
        return (f"non-finite meta-loss, gradient or task loss at step {step0 + i + 1} (meta-loss {loss}, "
                f"gradient norm {gnorm}, un-adapted loss {pre}; non-finite in {which}{also})")
    top = np.argsort(task_losses)[::-1][:3].tolist()
    return (f"exploding inner loop at step {step0 + i + 1}: the adapted query loss {loss:.4g} is "
            f"{loss / max(pre, 1e-30):.3g} times the un-adapted loss {pre:.4g} (max_loss_ratio {max_loss_ratio:g}); "
            f"worst tasks {top} of the meta-batch")


def chunk_record(name: str, step: int, metrics: dict[str, np.ndarray], seconds: float, length: int) -> dict:
    """One metrics.jsonl line: the chunk's mean of every metric the learner reports (over steps, and
    tasks for per-task ones), the last step's meta-loss, and the speed."""
    record: dict[str, Any] = {"phase": name, "step": step, "meta_loss": float(np.mean(metrics["meta_loss"])),
                              "meta_loss_last": float(metrics["meta_loss"][-1]),
                              "grad_norm": float(np.mean(metrics["grad_norm"]))}
    for key, value in metrics.items():
        if key not in record and np.issubdtype(np.asarray(value).dtype, np.number):
            record[key] = float(np.mean(value))
    record["steps_per_s"] = length / seconds
    record["wall_time"] = time.time()
    return record


def _preflight(learner: MetaLearner, tasks: TaskDistribution, optimiser, state: TrainState,
               meta_batch_size: int) -> None:
    """Traces one meta-step on shapes alone (nothing runs) so that a sampler, a learner or params that
    do not fit fail here with a message naming the part, not deep inside the compiled loop."""
    step = make_learner_step(learner, optimiser)

    def one(state):
        batch = sample_tasks(tasks, jax.random.key(0), meta_batch_size, tasks.data)
        return step(state, batch)

    try:
        new_state, _ = jax.eval_shape(one, state)
    except (TypeError, ValueError) as e:
        if str(e).startswith(("learner ", tasks.name)):  # our own checks already name the part
            raise
        raise type(e)(f"learner {learner.name!r} could not run one meta-step on a batch from task distribution "
                      f"{tasks.name!r} with these params (do the params fit the model, and the model the "
                      f"tasks' data?): {type(e).__name__}: {str(e).splitlines()[0]}") from e
    old, new = jax.tree.structure(state.params), jax.tree.structure(new_state.params)
    if old != new:  # type: ignore[operator]
        raise ValueError(f"learner {learner.name!r}: its gradient does not have the structure of its "
                         f"meta-parameters ({new} vs {old})")


# ---- fit -------------------------------------------------------------------------------------

def as_key(key: Any) -> PRNGKey:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    raise TypeError(f"key must be a jax.random.key(...) or an int seed, got {key!r}")


def check_lengths(steps: Any, meta_batch_size: Any, log_every: Any,
                  checkpoint_every: Any) -> tuple[int, int, int, int | None]:
    """A run's counts, checked (positive ints; checkpoints at a multiple of ``log_every``, since they are
    written between chunks)."""
    steps = check_positive_int(steps, "steps")
    meta_batch_size = check_positive_int(meta_batch_size, "meta_batch_size")
    log_every = check_positive_int(log_every, "log_every")
    if checkpoint_every is not None:
        checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
        if checkpoint_every % log_every:
            raise ValueError(f"checkpoint_every ({checkpoint_every}) must be a multiple of log_every ({log_every}): "
                             "checkpoints are written between chunks")
    return steps, meta_batch_size, log_every, checkpoint_every


class RunDir(NamedTuple):
    """Where a run keeps its files, and how ``fit`` owns the folder: ``fit(..., run=RunDir(path, ...))``
    (a plain path is ``RunDir(path)``).

    ``fit`` owns the folder while it runs (``jmaml.runstore``): it holds its lock, refuses a folder that
    already holds the run (finished or not) unless ``resume`` or ``overwrite`` says what to do with it,
    and never touches files that are not its run's.

    Attributes:
      path: the folder for ``NAME.ckpt.npz`` and ``metrics.jsonl`` (created if missing).
      checkpoint_every: meta-steps between checkpoints (a multiple of the log's ``every``; default: the
        end only; a stop by signal or divergence always writes one).
      resume: continue from the checkpoint (which must exist; a finished run is returned as it is).
        Refused when the run's fingerprint differs, naming what changed.
      overwrite: start over in a folder holding the run: its checkpoint and its metrics lines are
        replaced (recorded in the new checkpoint's ``history``); nothing else is touched.
      allow_changed: on ``resume``, continue the state with changed settings on purpose: True, or the
        names of the settings that may change (as the refusal names them, e.g. ``["optimiser"]``).
        Recorded in the checkpoint's ``history``.
      fingerprint: the settings that decide the run, as a JSON-able dict, when they cannot be read from
        the learner's, the tasks' and the optimiser's functions (a value read from a global or a file):
        it then replaces their automatic description (``jmaml.fingerprint.describe``). The meta-batch
        size, key, initial parameters, model state and precision are always included.
      meta: JSON-able facts recorded in every checkpoint's header beside the run's name and
        fingerprint (``jmaml inspect`` shows them).
    """

    path: str
    checkpoint_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    allow_changed: bool | Iterable[str] = False
    fingerprint: Mapping[str, Any] | None = None
    meta: Mapping[str, Any] | None = None


class Logging(NamedTuple):
    """How a run reports: ``fit(..., log=Logging(...))``.

    Attributes:
      every: meta-steps per compiled chunk, metrics line and progress update (the host reads metrics
        once per chunk).
      progress: a progress bar on a terminal (steps/s, meta-loss, ETA), throttled plain lines otherwise;
        a "compiling ..." line before the first chunk, which compiles (or loads from JAX's cache).
      stream: where progress goes (default stderr).
      writers: metric writers (``jmaml.writers``: ``JsonlWriter``, ``TensorBoardWriter``,
        ``CallbackWriter``, or any object with ``write(record)`` and ``flush()``), given every chunk's
        record -- the learner's scalars, ``steps_per_s``, ``wall_time``, and in the first record of each
        start ``time_to_first_chunk_s`` (compilation included) -- beside the run dir's
        ``metrics.jsonl``; process 0 alone writes. Flushed when the run ends or stops.
      callback: ``callback(record, state)`` after every chunk, with the metrics line as a dict (on
        every process of a multi-process job).
    """

    every: int = 1000
    progress: bool = True
    stream: TextIO | None = None
    writers: Any = None
    callback: Callable[[dict, Any], Any] | None = None


class RunPlan(NamedTuple):
    """One run as the engine carries it, resolved once from ``fit``'s (or ``fit_population``'s) arguments by
    ``run_plan``: where it lives and how it owns the folder (``run``), how it reports (``log``, ``sinks``), its
    length and name. The one set-up of a single run and a population."""

    path: str | None  # the run's folder; None: nothing on disk
    run: RunDir
    log: Logging
    steps: int
    meta_batch_size: int
    name: str
    stop_at_step: int | None
    sinks: list[Any]


def run_plan(run: Any, log: Any, steps: Any, meta_batch_size: Any, name: str,
             stop_at_step: int | None = None) -> RunPlan:
    """``fit``'s (and a population's) ``run=`` and ``log=``, checked: the folder (None: nothing on disk), its
    ``RunDir`` (a path becomes ``RunDir(path)``; no folder: the defaults), the ``Logging`` (None: the
    defaults), the checked counts (``check_lengths``) and the writers."""
    if run is not None and not isinstance(run, RunDir | str | os.PathLike):
        raise TypeError(f"run must be a folder (a path) or jmaml.RunDir(path, resume=..., ...), got {run!r}")
    if log is not None and not isinstance(log, Logging):
        raise TypeError(f"log must be jmaml.Logging(every=..., progress=..., ...), got {log!r}")
    where = run if isinstance(run, RunDir) else RunDir(os.fspath(run) if run is not None else "")
    if run is not None and (not isinstance(where.path, str | os.PathLike) or not os.fspath(where.path)):
        raise ValueError(f"run: the run's folder must be a non-empty path, got {where.path!r} (to train without a "
                         "folder, leave run out)")
    where = where._replace(path=os.fspath(where.path)) if run is not None else where
    logging = log or Logging()
    steps, meta_batch_size, every, checkpoint_every = check_lengths(steps, meta_batch_size, logging.every,
                                                                    where.checkpoint_every)
    where, logging = where._replace(checkpoint_every=checkpoint_every), logging._replace(every=every)
    if where.resume and where.overwrite:
        raise ValueError("resume and overwrite contradict each other: pick one")
    sinks = writers_mod.check_writers(logging.writers)
    return RunPlan(None if run is None else where.path, where, logging, steps, meta_batch_size, name, stop_at_step,
                   sinks)


def fit(learner: MetaLearner, tasks: TaskDistribution, optimiser: optax.GradientTransformation, params: Params, *,
        steps: int, meta_batch_size: int, key: Any = 0, model_state: Any = None, run: RunDir | str | None = None,
        log: Logging | None = None, name: str | None = None, max_loss_ratio: float = 1000.0,
        mesh: Mesh | None = None, host_loop: bool = False, stop_at_step: int | None = None,
        meta_batch_block: int | str | None = None) -> TrainState:
    """Meta-trains ``learner`` on ``tasks``; returns the final ``TrainState``.

    Args:
      learner: any ``jmaml.MetaLearner`` (``jmaml.learners`` has the MAML family).
      tasks: any ``jmaml.TaskDistribution``: ``tasks.sample(key, meta_batch_size)`` runs on the device
        inside the compiled loop.
      optimiser: any optax ``GradientTransformation`` (the meta-optimiser).
      params: the model's initial parameters (``learner.init`` makes the meta-parameters).
      steps: meta-steps to train to (counting those of a resumed run).
      meta_batch_size: tasks per meta-step.
      key: the key (or int seed) the training tasks are drawn from; each step splits it.
      model_state: the initial state of a model with state (``model.init_state()``), carried in
        ``TrainState.model_state``, updated by the learner at every step and checkpointed; the
        learner's loss must be stateful (``make_loss(..., stateful=True)``).
      run: where the run keeps its checkpoints and metrics, and how it owns the folder: a path, or
        ``RunDir(path, checkpoint_every=, resume=, overwrite=, allow_changed=, fingerprint=, meta=)``.
        None keeps nothing on disk.
      log: ``Logging(every=1000, progress=True, stream=None, writers=None, callback=None)``.
      name: the run's name in files and messages (default ``learner.name``).
      max_loss_ratio: stop at the first step whose adapted query loss is more than this many times its
        un-adapted one (an exploding inner loop; ``diverged_steps`` is the rule, the same for
        populations), keeping the state before it; ``math.inf`` disables.
      meta_batch_block: process each meta-batch in blocks of this many tasks (``jmaml.blocking``: the
        same gradient to float round-off, a working set that stays in cache); ``"auto"`` times a few
        block sizes on the first compile and keeps the fastest -- timed in this process, so under its
        ``XLA_FLAGS`` (which the run records); None: the whole meta-batch at once. The
        block is part of the run's fingerprint, and a resumed ``"auto"`` run keeps the block it chose,
        whatever the machine's load or XLA settings now, so its numbers do not change. With a ``mesh``: tasks per block
        within each device's shard.
      mesh: shard each meta-batch's tasks over this mesh (``jmaml.distributed.task_mesh``). In a
        multi-process job every process calls ``fit`` alike; process 0 alone writes files.
      host_loop: a Python loop over a jitted step instead of a compiled scan (see ``make_chunk``).
      stop_at_step: stop with a checkpoint (raising ``Interrupted``) at this step: what an
        interruption does, on purpose (tests use it). SIGINT/SIGTERM do the same between chunks
        (the ``jmaml`` command's handler, or one ``fit`` installs).

    Raises:
      DivergenceError: a non-finite or exploding meta-loss (the last good state is kept).
      Interrupted: SIGINT/SIGTERM or ``stop_at_step``, after writing a checkpoint.
      ValueError/TypeError: bad arguments, a sampler without a task axis, a learner's missing metric,
        params that do not fit; a run folder in use by another writer, holding this run without
        ``resume``/``overwrite``, or one resumed with other settings (naming them); a missing
        checkpoint on ``resume``.
      checkpoint.CheckpointError: an unreadable or corrupted checkpoint (nothing is overwritten).

    Examples:
      >>> import jax, optax
      >>> from jmaml import Logging, fit, learners, make_loss, models, tasks
      >>> model = models.mlp([1, 8, 1])
      >>> learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
      >>> state = fit(learner, tasks.sinusoid.distribution(), optax.adam(1e-3), model.init(jax.random.key(0)),
      ...             steps=20, meta_batch_size=4, log=Logging(every=10, progress=False))
      >>> int(state.step)
      20

    Returns:
      The final ``TrainState`` (``params``, ``opt_state``, ``step``, ``key``, ``model_state``).
    """
    check_learner(learner)
    check_distribution(tasks)
    if not isinstance(optimiser, optax.GradientTransformation):
        raise TypeError(f"optimiser must be an optax.GradientTransformation, got {optimiser!r}")
    protocols.check_optimiser_fits(learner, optimiser)
    check_max_loss_ratio(max_loss_ratio)
    plan = run_plan(run, log, steps, meta_batch_size, name or learner.name, stop_at_step)
    if mesh is not None:
        distributed.check_divisible(plan.meta_batch_size, mesh)
    writer = distributed.is_writer()
    try:
        state = initial_state(learner, params, optimiser, as_key(key), model_state)
    except (TypeError, ValueError) as e:
        raise type(e)(f"learner {learner.name!r} could not initialise from these params: {e}") from e
    settings = run_settings(learner, tasks, optimiser, state, plan.meta_batch_size, plan.run.fingerprint)
    with runstore.lock(plan.path) if plan.path is not None and writer else contextlib.nullcontext():
        block = choose_block(meta_batch_block, learner, tasks, optimiser, state, plan.meta_batch_size,
                             run_dir=plan.path, name=plan.name, resume=plan.run.resume, stream=plan.log.stream,
                             mesh=mesh, host_loop=host_loop)
        if block is not None:
            settings["meta_batch_block"] = block
            learner = blocking.blocked(learner, block, mesh)
        return _fit_owned(learner, tasks, optimiser, state, settings, plan, max_loss_ratio=max_loss_ratio,
                          mesh=mesh, host_loop=host_loop)


CALIBRATION_STEPS = 3  # meta-steps per timed chunk when meta_batch_block="auto" calibrates
CALIBRATION_ROUNDS = 3  # timed rounds per candidate, interleaved; the best is kept
CALIBRATION_SECONDS = 0.1  # a round repeats a candidate's chunk until this long: a 40 ms chunk is mostly noise
CALIBRATION_MARGIN = 1.05  # a block must be this much faster than the whole batch to be chosen
CALIBRATION_BUDGET = 30.0  # seconds of timing after which no further round starts (a slow image step: one round)
BLOCK_CANDIDATES = (8, 16, 25, 32, 50, 64, 100, 125, 128, 200, 250, 256, 500, 512, 1000, 1024, 2000, 2500, 5000)


def pick_block(timings: Mapping[int, float], whole: int, margin: float = CALIBRATION_MARGIN) -> int:
    """The block ``"auto"`` keeps from measured seconds per meta-step: the fastest, but the whole batch
    (``whole``) unless that one is at least ``margin`` times faster -- a block must earn its place, and a
    difference within the timing noise must not make a run take the slower program."""
    fastest = min(timings, key=lambda size: (timings[size], -size))
    return fastest if timings[fastest] * margin <= timings[whole] else whole


def block_candidates(meta_batch_size: int, limit: int = 5) -> list[int]:
    """Block sizes worth timing for a meta-batch: the whole batch and up to ``limit - 1`` of its
    divisors among ``BLOCK_CANDIDATES``, spread geometrically."""
    divisors = [d for d in BLOCK_CANDIDATES if d < meta_batch_size and meta_batch_size % d == 0]
    if len(divisors) > limit - 1:
        picks = np.unique(np.round(np.linspace(0, len(divisors) - 1, limit - 1)).astype(int))
        divisors = [divisors[i] for i in picks]
    return [meta_batch_size, *sorted(divisors, reverse=True)]


def _previous_block(run_dir: str | None, name: str) -> tuple[bool, int | None]:
    """Whether ``run_dir`` holds a checkpoint of run ``name`` that records its block, and the block."""
    if run_dir is None:
        return False, None
    path = os.path.join(run_dir, f"{name}.ckpt.npz")
    try:
        record = checkpoint.read_header(path).get("extra", {}).get("fit") or {}
    except checkpoint.CheckpointError:
        return False, None
    settings = record.get("settings") if isinstance(record, dict) else None
    if not isinstance(settings, dict):
        return False, None
    return True, settings.get("meta_batch_block")


def choose_block(block: int | str | None, learner: MetaLearner, tasks: TaskDistribution,
                 optimiser: optax.GradientTransformation, state: TrainState, meta_batch_size: int, *,
                 run_dir: str | None, name: str, resume: bool, stream: TextIO | None, mesh: Mesh | None = None,
                 host_loop: bool = False) -> int | None:
    """The block size a run uses (see ``fit``'s ``meta_batch_block``): None, a checked int, or for
    ``"auto"`` the resumed run's own choice or the fastest of ``block_candidates`` timed now (each a
    compiled chunk of ``CALIBRATION_STEPS`` meta-steps, repeated for at least ``CALIBRATION_SECONDS`` per
    round, the best of ``CALIBRATION_ROUNDS`` rounds that time every candidate in turn -- no round starts
    after ``CALIBRATION_BUDGET`` seconds, so a slow step is timed once; ``pick_block`` keeps
    the whole batch unless a block is ``CALIBRATION_MARGIN`` times faster). With a ``mesh`` the
    block is within each device's shard. Returns None for the whole meta-batch (shard)."""
    if block == "auto":
        if resume:
            found, previous = _previous_block(run_dir, name)
            if found:
                return previous
        shard = meta_batch_size // blocking.shard_count(mesh)
        if len(block_candidates(shard)) == 1:  # nothing to choose between: no timing
            print(f"jmaml: meta_batch_block auto: {shard} tasks per block{' per device' if mesh is not None else ''}"
                  f" (the whole {'shard' if mesh is not None else 'batch'}: no smaller candidate divides it)",
                  file=stream or sys.stderr)
            return None
        chunks = {}
        for size in block_candidates(shard):  # each timed as the run will run it: a compiled chunk
            candidate = learner if size == shard else blocking.blocked(learner, size, mesh)
            chunks[size] = make_chunk(candidate, tasks, optimiser, meta_batch_size=meta_batch_size, mesh=mesh,
                                      host_loop=host_loop)
            jax.block_until_ready(chunks[size](state, CALIBRATION_STEPS)[1])  # compiled and warm
        timings = dict.fromkeys(chunks, math.inf)
        began = time.perf_counter()
        for round_ in range(CALIBRATION_ROUNDS):  # round-robin, so a change of load mid-way touches every one
            if round_ and time.perf_counter() - began > CALIBRATION_BUDGET:
                break
            for size, chunk in chunks.items():
                start, calls = time.perf_counter(), 0
                while calls == 0 or time.perf_counter() - start < CALIBRATION_SECONDS:
                    jax.block_until_ready(chunk(state, CALIBRATION_STEPS)[1])
                    calls += 1
                timings[size] = min(timings[size], (time.perf_counter() - start) / (calls * CALIBRATION_STEPS))
        chosen = pick_block(timings, shard)
        chosen = distributed.broadcast_int(chosen)  # every process runs one program: process 0's timing decides
        shown = ", ".join(f"{size}: {1e3 * t:.1f} ms" for size, t in timings.items())
        flags = runstore.xla_flags()  # timed under this process's XLA settings, which the run records
        print(f"jmaml: meta_batch_block auto: {chosen} tasks per block{' per device' if mesh is not None else ''} "
              f"(one meta-step: {shown}{f'; under XLA_FLAGS={flags!r}' if flags else ''})", file=stream or sys.stderr)
        return None if chosen == shard else chosen
    return blocking.check_block(block, meta_batch_size, mesh)


def run_settings(learner: MetaLearner, tasks: TaskDistribution, optimiser: optax.GradientTransformation,
                 state: TrainState, meta_batch_size: int, fingerprint: Mapping[str, Any] | None = None) -> dict:
    """What decides a run's trajectory (``jmaml.fingerprint``): recorded in its checkpoints and
    compared on resume. ``fingerprint`` (the user's own settings) replaces the automatic description
    of the learner's, the tasks' and the optimiser's functions."""
    out: dict[str, Any] = {
        "learner": learner.name, "meta_batch_size": meta_batch_size,
        "key": fp.describe(state.key), "params": fp.digest_array_tree(state.params),
        "model_state": fp.digest_array_tree(state.model_state), "x64": bool(jax.config.read("jax_enable_x64")),
    }
    if fingerprint is not None:
        if not isinstance(fingerprint, Mapping):
            raise TypeError(f"fingerprint must be a dict of the run's settings (JSON-able), got {fingerprint!r}")
        out["settings"] = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))
    else:
        out["learner_fns"] = fp.describe({"hyper": learner.hyper, "init": learner.init, "estimate": learner.estimate})
        out["tasks"] = fp.describe({"name": tasks.name, "sample": tasks.sample, "data": tasks.data})
        out["optimiser"] = fp.describe(optimiser)
    return out


def _fit_owned(learner: MetaLearner, tasks: TaskDistribution, optimiser: optax.GradientTransformation,
               state: TrainState, settings: dict, plan: RunPlan, *, max_loss_ratio: float, mesh: Mesh | None,
               host_loop: bool) -> TrainState:
    writer = distributed.is_writer()
    name = plan.name
    ckpt, run_record, state = take_run(plan, state, settings)
    if int(state.step) >= plan.steps:
        return state
    state = distributed.put_replicated(state, mesh)
    chunk = make_chunk(learner, tasks, optimiser, meta_batch_size=plan.meta_batch_size, mesh=mesh,
                       host_loop=host_loop)
    _preflight(learner, tasks, optimiser, state, plan.meta_batch_size)
    saver = Saver(ckpt if writer else None, name, {**(plan.run.meta or {}), "fit": run_record}, int(state.step))

    def finish(state: TrainState, new_state: TrainState, step: int, metrics: dict, seconds: float, length: int):
        bad = np.asarray(diverged_steps(metrics, max_loss_ratio))
        if bad.any():
            good = int(np.argmax(bad))  # the steps before the diverged one
            msg = describe_divergence(step, good, metrics, max_loss_ratio)
            if good:  # the state just before the diverged step: those steps again from the chunk's start
                state = chunk(state, good)[0]
            saver.keep(state, step + good)
            kept = f" is kept in {ckpt}" if ckpt is not None else " is the one before this chunk"
            label = learner.label if name == learner.name else name
            raise DivergenceError(f"{label} training diverged: {msg}. The last good state (step {saver.saved_step})"
                                  f"{kept}")
        return new_state, chunk_record(name, step + length, metrics, seconds, length)

    return train_loop(state, int(state.step), plan, chunk=chunk, finish=finish, saver=saver)


def take_run(plan: RunPlan, state: Any, settings: dict) -> tuple[str | None, dict | None, Any]:
    """Checks what the plan's folder holds of its run (``runstore.open_run``) and, on resume, restores its
    checkpoint into ``state``'s structure; process 0 decides and the others follow. Returns the
    checkpoint's path, the record for its header and the state (broadcast to every process)."""
    writer = distributed.is_writer()
    run_dir, name, where = plan.path, plan.name, plan.run
    ckpt, run_record, refusal = None, None, None
    if run_dir is not None and writer:
        try:
            ckpt, run_record = runstore.open_run(run_dir, name, steps=plan.steps, resume=where.resume,
                                                 overwrite=where.overwrite, allow_changed=where.allow_changed,
                                                 fingerprint=fp.digest(settings), settings=settings)
            if where.resume:
                state, _ = checkpoint.restore(ckpt, state)
        except (ValueError, checkpoint.CheckpointError) as e:
            refusal = e
    elif run_dir is not None:
        ckpt = os.path.join(run_dir, f"{name}.ckpt.npz")
    if distributed.broadcast_int(-1 if refusal is not None else 0) < 0:
        if refusal is not None:
            raise refusal
        raise distributed.DistributedError(f"process 0 refused the run dir {run_dir} (its error says why)")
    return ckpt, run_record, distributed.broadcast_from_writer(state)


class Saver:
    """Writes a run's checkpoint (process 0 alone; nothing without a run dir) and remembers the
    step of the last one written."""

    def __init__(self, path: str | None, name: str, extra: dict[str, Any], saved_step: int):
        self.path, self.name, self.extra, self.saved_step = path, name, extra, saved_step

    def save(self, state: Any, step: int) -> None:
        if self.path is not None:
            checkpoint.save(self.path, distributed.to_host(state), step=step, extra={"phase": self.name, **self.extra})
        self.saved_step = step

    def keep(self, state: Any, step: int) -> None:
        """Saves the last good state before a stop, unless it is already the one on disk."""
        if step > self.saved_step or (self.path is not None and not os.path.exists(self.path)):
            self.save(state, step)


def train_loop(state: Any, step: int, plan: RunPlan, *, chunk: Callable, finish: Callable, saver: Saver) -> Any:
    """The one training loop of the engine, for a single run (``fit``) and a population
    (``jmaml.population.fit_population``): chunks of steps aligned to multiples of ``log_every`` from
    step 0 (so an interrupted and resumed run executes the same programs on the same states),
    ``finish(state, new_state, step, metrics, seconds, length) -> (state, record)`` after each (it
    raises on divergence), metrics lines and writers, progress, callback, checkpoints, and
    SIGINT/SIGTERM (the installed ``StopFlag``, or one of its own) or ``stop_at_step`` stopping between
    chunks with a checkpoint."""
    name, steps, run_dir, stop_at_step = plan.name, plan.steps, plan.path, plan.stop_at_step
    log_every, progress, stream, _, callback = plan.log
    checkpoint_every, sinks = plan.run.checkpoint_every, list(plan.sinks)
    writer = distributed.is_writer()
    started, first = time.perf_counter(), True
    bar = Progress(name, steps, step, stream) if progress else None
    if run_dir is not None:
        sinks.insert(0, writers_mod.JsonlWriter(os.path.join(run_dir, runstore.METRICS_FILE)))
    flag = _signals.active()
    owned_flag = flag is None
    flag = flag or StopFlag()
    if owned_flag:
        flag.__enter__()
    try:
        while step < steps:
            if flag.signum is not None:
                saver.save(state, step)
                signame = signal.Signals(flag.signum).name
                raise Interrupted(f"{signame} received: stopped {name} at step {step}/{steps}; checkpoint saved",
                                  flag.signum)
            if stop_at_step is not None and step >= stop_at_step:
                saver.save(state, step)
                raise Interrupted(f"stopped {name} at step {step} as asked; checkpoint saved")
            length = min(log_every - step % log_every, steps - step)  # chunks aligned to multiples of log_every
            if first and bar is not None and writer:  # the first call compiles (or loads from the cache)
                print(f"{name}: compiling a chunk of {length} meta-steps from step {step} ...", file=bar.stream,
                      flush=True)
            t0 = time.perf_counter()
            new_state, metrics = chunk(state, length)
            metrics = distributed.to_host(metrics)
            state, record = finish(state, new_state, step, metrics, time.perf_counter() - t0, length)
            if first:  # how long this start took to make progress: compilation or its cache load included
                record["time_to_first_chunk_s"] = time.perf_counter() - started
                first = False
            step += length
            if writer:
                for sink in sinks:
                    sink.write(record)
                if bar is not None:
                    bar.update(step, record["meta_loss"], record["steps_per_s"], final=step >= steps)
            if callback is not None:
                callback(record, state)
            if (checkpoint_every is not None and step % checkpoint_every == 0) or step >= steps:
                saver.save(state, step)
        if flag.signum is not None:  # a signal during the last chunk: finished and saved, but still a stop
            signame = signal.Signals(flag.signum).name
            raise Interrupted(f"{signame} received: {name} finished its {steps} steps; checkpoint saved",
                              flag.signum)
    finally:
        if owned_flag:
            flag.__exit__(None, None, None)
        if writer:
            for sink in sinks:
                sink.flush()
    return state
