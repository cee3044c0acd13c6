"""The meta-training loop around ``make_step``: many steps per jitted call, progress, metrics,
checkpoints, exact resume, interruption and divergence handling.

A run lives in a folder (the *run dir*)::

    config.json          the TrainConfig, versions, and when it was made
    metrics.jsonl        one line per chunk of steps: phase, step, meta-loss, grad norm, steps/s
    maml.ckpt.npz        the whole MAML TrainState (params, optimiser state, step, key)
    pretrained.ckpt.npz  the "pretrained" baseline: the same network trained by plain regression

Steps run in *chunks* of ``log_every`` steps: one jitted ``lax.scan`` samples the tasks on the
device and applies ``log_every`` meta-steps, and metrics come back to the host once per chunk.
Chunks are aligned to multiples of ``log_every`` from step 0, so a run that is interrupted and
resumed executes exactly the same programs on exactly the same states and keys as one that is
not: the final parameters are bitwise equal on CPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jmaml import checkpoint, distributed
from jmaml._checks import (
    check_nonnegative_int,
    check_num_steps,
    check_positive_finite,
    check_positive_int,
    check_rate,
    check_seed,
)
from jmaml.algorithms import ALGORITHM_LABELS, LEARNED_RATES, Algorithm, check_algorithm, make_algorithm, rate_optimiser
from jmaml.estimators import make_estimator_step
from jmaml.losses import make_loss
from jmaml.meta import TrainState, init_state, make_step
from jmaml.models import ACTIVATIONS, conv4, mlp
from jmaml.tasks import images, sinusoid
from jmaml.types import LossFn, Model, Task


def _momentum(learning_rate: float) -> optax.GradientTransformation:
    return optax.sgd(learning_rate, momentum=0.9)


# Each takes the meta rate as its `learning_rate` argument, so optax.inject_hyperparams can make
# it a traced hyperparameter (jmaml.sweep vmaps runs over it).
OPTIMISERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "momentum": _momentum,
    "rmsprop": optax.rmsprop,
}
PHASES = ("maml", "pretrained")
TASKS = ("sinusoid", "omniglot", "miniimagenet")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Sinusoid meta-training settings; the defaults are the MAML paper's (Section 5.1)."""

    hidden: tuple[int, ...] = (40, 40)  # MLP 1-40-40-1
    activation: str = "relu"
    num_support: int = 10  # K
    num_query: int = 10
    inner_lr: float = 0.01  # α
    num_inner_steps: int = 1  # k
    meta_lr: float = 1e-3  # β
    optimiser: str = "adam"
    meta_batch_size: int = 25
    loss: str = "mse"
    steps: int = 70_000
    seed: int = 0  # initial parameters (and tasks, unless task_seed is set)
    task_seed: int | None = None  # the stream of training tasks; None: derived from seed
    first_order: bool = False  # FOMAML (with algo "maml"; algo "fomaml" is the same)
    # The meta-learning algorithm (jmaml.algorithms.ALGORITHMS) and its own settings.
    algo: str = "maml"
    imaml_lambda: float = 1.0  # iMAML's proximal strength λ
    imaml_cg_iters: int = 5  # iMAML's conjugate-gradient iterations
    mamlpp_msl: bool = True  # MAML++'s multi-step loss
    mamlpp_msl_anneal_steps: int | None = None  # meta-steps it anneals over; None: a tenth of `steps`
    mamlpp_first_order_steps: int = 0  # MAML++'s derivative-order annealing: first order before this step
    # The meta rate of the learned inner rates (Meta-SGD, MAML++), with the same optimiser; None: meta_lr.
    rate_meta_lr: float | None = None
    remat: bool = False  # rematerialise inner steps on the backward pass (memory for long k)
    # Inner-loop unrolling: None = auto (straight-line code for k <= 8, measured faster on CPU and
    # GPU; a rolled lax.scan beyond, whose compile time does not grow with k); or as jmaml.adapt.
    unroll: int | bool | None = None
    checkpoint_every: int = 5_000
    log_every: int = 1_000  # steps per jitted chunk, and per metrics line
    pretrain: bool = True  # also train the "pretrained" regression baseline
    # The task: sinusoid regression, or few-shot classification from image folders (jmaml.tasks.images).
    task: str = "sinusoid"
    data_dir: str | None = None  # the dataset's folder (image tasks)
    ways: int = 5  # N classes per episode (image tasks); num_support / num_query are then per class
    image_size: int | None = None  # None: 28 (Omniglot), 84 (miniImageNet)
    num_train_classes: int = 1200  # Omniglot characters used for meta-training (the rest are test classes)
    eval_inner_steps: int = 10  # inner steps at test time (evaluation curves run 0..this)
    # Stop when, over a chunk, the adapted query loss averages more than this many times the
    # un-adapted one: the inner loop is exploding (the seed's -1515.48, at scale). inf disables.
    max_loss_ratio: float = 1000.0

    def validate(self) -> TrainConfig:
        """Checks every field; returns self. Raises ValueError/TypeError naming the field."""
        if not isinstance(self.hidden, tuple) or not self.hidden:
            raise ValueError(f"hidden must be a non-empty tuple of widths, got {self.hidden!r}")
        for i, h in enumerate(self.hidden):
            check_positive_int(h, f"hidden[{i}]")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.optimiser not in OPTIMISERS:
            raise ValueError(f"optimiser must be one of {sorted(OPTIMISERS)}, got {self.optimiser!r}")
        if self.loss not in ("mse", "sse"):
            raise ValueError(f"loss must be 'mse' or 'sse' for regression, got {self.loss!r}")
        for name in ("num_support", "num_query", "meta_batch_size", "steps", "checkpoint_every",
                     "log_every"):
            check_positive_int(getattr(self, name), name)
        check_num_steps(self.num_inner_steps, "num_inner_steps")
        self._validate_algorithm()
        self._validate_task()
        if self.unroll is not None and not isinstance(self.unroll, bool) and (
                not isinstance(self.unroll, int) or self.unroll < 1):
            raise ValueError(f"unroll must be None (auto), a bool or an int >= 1, got {self.unroll!r}")
        check_rate(self.inner_lr, "inner_lr")
        check_rate(self.meta_lr, "meta_lr", allow_zero=False)
        if isinstance(self.max_loss_ratio, bool) or not isinstance(self.max_loss_ratio, (int, float)) \
                or not self.max_loss_ratio > 1:
            raise ValueError(f"max_loss_ratio must be a number > 1 (inf disables), got {self.max_loss_ratio!r}")
        check_seed(self.seed, "seed")
        if self.task_seed is not None:
            check_seed(self.task_seed, "task_seed")
        if self.checkpoint_every % self.log_every:
            raise ValueError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of "
                             f"log_every ({self.log_every}): checkpoints are written between chunks")
        return self

    def _validate_task(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        check_positive_int(self.eval_inner_steps, "eval_inner_steps")
        if self.task == "sinusoid":
            if self.data_dir is not None:
                raise ValueError("data_dir applies to the image tasks (omniglot, miniimagenet), not sinusoid")
            return
        if not self.data_dir:
            raise ValueError(f"task {self.task!r} needs data_dir: the folder holding the dataset")
        check_positive_int(self.ways, "ways")
        if self.ways < 2:
            raise ValueError(f"ways must be >= 2 for classification, got {self.ways}")
        if self.image_size is not None:
            check_positive_int(self.image_size, "image_size")
        check_positive_int(self.num_train_classes, "num_train_classes")
        if self.loss != "mse":
            raise ValueError(f"loss applies to sinusoid; image tasks use softmax cross-entropy (got {self.loss!r})")

    def phases(self) -> tuple[str, ...]:
        """The phases a run trains: the meta-learner, and the pretrained baseline for sinusoid."""
        return PHASES if self.pretrain and self.task == "sinusoid" else PHASES[:1]

    def resolved_image_size(self) -> int:
        return self.image_size or (28 if self.task == "omniglot" else 84)

    def _validate_algorithm(self) -> None:
        check_algorithm(self.algo)
        defaults = TrainConfig()
        own = {("imaml",): ("imaml_lambda", "imaml_cg_iters"),
               ("mamlpp",): ("mamlpp_msl", "mamlpp_msl_anneal_steps", "mamlpp_first_order_steps"),
               LEARNED_RATES: ("rate_meta_lr",)}
        for algos, fields in own.items():
            for name in fields:
                if self.algo not in algos and getattr(self, name) != getattr(defaults, name):
                    which = f"algo {algos[0]!r}" if len(algos) == 1 else "algos " + ", ".join(map(repr, algos))
                    raise ValueError(f"{name} = {getattr(self, name)!r} applies to {which} only; "
                                     f"this run's algo is {self.algo!r}")
        if self.first_order and self.algo not in ("maml", "fomaml"):
            raise ValueError(f"first_order applies to algo 'maml' only (that is algo 'fomaml'); got algo {self.algo!r}")
        if self.algo in ("reptile", "mamlpp", "imaml") and self.num_inner_steps < 1:
            raise ValueError(f"algo {self.algo!r} needs num_inner_steps >= 1, got {self.num_inner_steps}")
        if self.remat and self.algo in ("mamlpp", "imaml"):
            raise ValueError(f"remat is not available for algo {self.algo!r}")
        check_positive_finite(self.imaml_lambda, "imaml_lambda")
        check_positive_int(self.imaml_cg_iters, "imaml_cg_iters")
        if self.mamlpp_msl_anneal_steps is not None:
            check_positive_int(self.mamlpp_msl_anneal_steps, "mamlpp_msl_anneal_steps")
        check_nonnegative_int(self.mamlpp_first_order_steps, "mamlpp_first_order_steps")
        if self.rate_meta_lr is not None:
            check_rate(self.rate_meta_lr, "rate_meta_lr")

    def algorithm_settings(self) -> dict[str, Any]:
        """The settings the chosen algorithm actually uses, with defaults resolved (for the run dir)."""
        out: dict[str, Any] = {"algo": self.algo, "inner_lr": self.inner_lr, "num_inner_steps": self.num_inner_steps}
        if self.algo in ("maml", "fomaml"):
            out["first_order"] = self.first_order or self.algo == "fomaml"
        if self.algo == "imaml":
            out.update(imaml_lambda=self.imaml_lambda, imaml_cg_iters=self.imaml_cg_iters)
        if self.algo == "mamlpp":
            out.update(mamlpp_msl=self.mamlpp_msl, mamlpp_msl_anneal_steps=self.msl_anneal_steps(),
                       mamlpp_first_order_steps=self.mamlpp_first_order_steps)
        if self.algo == "anil":
            out["anil_adapts"] = "the last layer"
        if self.algo in LEARNED_RATES:
            out["rate_meta_lr"] = self.meta_lr if self.rate_meta_lr is None else self.rate_meta_lr
        return out

    def msl_anneal_steps(self) -> int:
        """MAML++'s multi-step-loss annealing length: the field, or a tenth of ``steps``."""
        if self.mamlpp_msl_anneal_steps is not None:
            return self.mamlpp_msl_anneal_steps
        return max(1, self.steps // 10)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


def image_preset(task: str, ways: int = 5, shots: int = 1) -> dict[str, Any]:
    """The MAML paper's settings (Section 5.2 and its code) for a few-shot classification task, as
    TrainConfig fields: inner rate, inner steps at training and at test, meta-batch; 15 query images
    per class, Adam 1e-3, 60,000 meta-steps; no pretrained baseline."""
    if task not in TASKS[1:]:
        raise ValueError(f"presets exist for {', '.join(TASKS[1:])}; got {task!r}")
    common = {"num_query": 15, "pretrain": False, "steps": 60_000, "log_every": 100, "checkpoint_every": 1_000,
              "meta_lr": 1e-3}
    if task == "omniglot":
        if ways >= 20:
            return {**common, "inner_lr": 0.1, "num_inner_steps": 5, "eval_inner_steps": 5, "meta_batch_size": 16}
        return {**common, "inner_lr": 0.4, "num_inner_steps": 1, "eval_inner_steps": 3, "meta_batch_size": 32}
    return {**common, "inner_lr": 0.01, "num_inner_steps": 5, "eval_inner_steps": 10,
            "meta_batch_size": 4 if shots == 1 else 2}


class DivergenceError(RuntimeError):
    """Meta-training produced a non-finite loss or gradient."""


class Interrupted(Exception):  # noqa: N818 - it is a control-flow signal, not an error
    """Training stopped on request (signal or ``stop_at_step``) after writing a checkpoint."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


# ---- building blocks ------------------------------------------------------------------------

def build_model(config: TrainConfig) -> tuple[Model, LossFn]:
    """The model and loss a config describes: the MLP for sinusoid; for image tasks the paper's
    Conv-4 (Omniglot: 64 filters, strided; miniImageNet: 32 filters, max-pooling) with softmax
    cross-entropy."""
    if config.task == "sinusoid":
        model = mlp([1, *config.hidden, 1], config.activation)
        return model, make_loss(model.apply, config.loss)
    omniglot = config.task == "omniglot"
    model = conv4(config.ways, in_channels=1 if omniglot else 3, filters=64 if omniglot else 32, strided=omniglot,
                  image_size=config.resolved_image_size())
    return model, make_loss(model.apply, "xent")


@functools.lru_cache(maxsize=4)
def _image_splits(task: str, data_dir: str, image_size: int, num_train_classes: int,
                  min_per_class: int) -> dict[str, Any]:
    if task == "omniglot":
        return images.load_omniglot(data_dir, image_size=image_size, num_train_classes=num_train_classes,
                                    min_per_class=min_per_class)
    return images.load_miniimagenet(data_dir, image_size=image_size, min_per_class=min_per_class)


def task_data(config: TrainConfig, split: str = "train") -> jax.Array | None:
    """The on-device image array a config's episodes are drawn from (None for sinusoid).

    Decoded from ``config.data_dir`` (or its cache) once per process; checked to hold enough
    classes for ``ways`` and images for ``num_support + num_query`` per class.
    """
    if config.task == "sinusoid":
        return None
    per_class = config.num_support + config.num_query
    splits = _image_splits(config.task, config.data_dir, config.resolved_image_size(), config.num_train_classes,
                           per_class)
    data = splits[split]
    images.check_episode(data, config.ways, config.num_support, config.num_query,
                         what=f"{config.task} {split} split in {config.data_dir}")
    return jnp.asarray(data.images)


AUTO_UNROLL_MAX_K = 8


def effective_unroll(unroll: int | bool | None, num_inner_steps: int) -> int | bool:
    """Resolves ``unroll=None`` (auto): fully unrolled for k <= 8, a rolled scan beyond."""
    if unroll is None:
        return True if num_inner_steps <= AUTO_UNROLL_MAX_K else 1
    return unroll


def build_optimiser(config: TrainConfig, phase: str = "maml") -> optax.GradientTransformation:
    """The meta-optimiser of a phase: ``config.optimiser`` at ``meta_lr``; with ``rate_meta_lr``,
    the learned inner rates get their own instance at that rate."""
    optimiser = OPTIMISERS[config.optimiser]
    if phase == "maml" and config.rate_meta_lr is not None:
        return rate_optimiser(optimiser(config.meta_lr), optimiser(config.rate_meta_lr))
    return optimiser(config.meta_lr)


def build_algorithm(config: TrainConfig, loss_fn: LossFn | None = None) -> Algorithm:
    """The config's meta-learning algorithm (``jmaml.algorithms``), on ``loss_fn`` (default: the
    config's training loss)."""
    if loss_fn is None:
        loss_fn = build_model(config)[1]
    return make_algorithm(
        config.algo, loss_fn, inner_lr=config.inner_lr, num_inner_steps=config.num_inner_steps,
        first_order=config.first_order, imaml_lambda=config.imaml_lambda, imaml_cg_iters=config.imaml_cg_iters,
        mamlpp_msl=config.mamlpp_msl, mamlpp_msl_anneal_steps=config.msl_anneal_steps(),
        mamlpp_first_order_steps=config.mamlpp_first_order_steps, remat=config.remat,
        unroll=effective_unroll(config.unroll, config.num_inner_steps))


def initial_state(config: TrainConfig, phase: str = "maml") -> TrainState:
    """The step-0 state of a phase: both phases start from the same initial model parameters (the
    meta-learning phase adds what its algorithm learns besides them, e.g. Meta-SGD's rates)."""
    model, _ = build_model(config)
    key_init = jax.random.split(jax.random.key(config.seed))[0]
    params = model.init(key_init)
    if phase == "maml":
        params = build_algorithm(config).init(params)
    return init_state(params, build_optimiser(config, phase), task_stream_key(config, phase))


def task_stream_key(config: TrainConfig, phase: str = "maml") -> jax.Array:
    """The key a phase's training tasks are drawn from (each step splits it)."""
    seed = config.seed if config.task_seed is None else config.task_seed
    return jax.random.fold_in(jax.random.split(jax.random.key(seed))[1], PHASES.index(phase))


def sample_meta_batch(config: TrainConfig, key: jax.Array, data: jax.Array | None = None) -> Task:
    """One meta-batch of training tasks as the config describes it (sampled on the device); image
    tasks draw N-way episodes from ``data`` (``task_data``)."""
    if config.task == "sinusoid":
        return sinusoid.sample_tasks(key, config.meta_batch_size, num_support=config.num_support,
                                     num_query=config.num_query)
    return images.sample_tasks(key, data, config.meta_batch_size, ways=config.ways, shots=config.num_support,
                               queries=config.num_query)


@functools.lru_cache(maxsize=16)
def make_chunk(config: TrainConfig, phase: str = "maml",
               mesh: Mesh | None = None) -> Callable[[TrainState, int], tuple]:
    """A jitted ``chunk(state, length) -> (state, metrics)`` running ``length`` steps in a scan.

    Each step splits the state's key, samples a meta-batch of sinusoid tasks on the device and
    applies one meta-step of the config's algorithm. Phase ``"pretrained"`` is plain regression on
    the query points (the MAML objective with k = 0), the paper's "pretrained" baseline. Cached per
    (config, phase, mesh), so resuming or re-running a configuration in one process reuses its compilation.

    With a ``mesh`` (``jmaml.distributed.task_mesh``) the meta-batch is sharded over its devices'
    task axis and the state stays replicated; XLA derives the cross-device reduction of the
    meta-gradient from those shardings. Per-task metrics are replicated for the host.
    """
    _, loss_fn = build_model(config)
    if phase == "maml":
        algo = build_algorithm(config, loss_fn)
        step = make_estimator_step(build_optimiser(config), algo.estimator, **algo.hyper)
    else:
        step = make_step(build_optimiser(config, phase), loss_fn, inner_lr=config.inner_lr, num_inner_steps=0)

    def one(state: TrainState, data):
        key, key_tasks = jax.random.split(state.key)
        tasks = distributed.shard_tasks(sample_meta_batch(config, key_tasks, data), mesh)
        new_state, metrics = step(state._replace(key=key), tasks)
        return distributed.replicate(new_state, mesh), distributed.replicate(metrics, mesh)

    @jax.jit
    def _chunk(state: TrainState, length_marker: jax.Array, data):
        # the images are closed over (a loop invariant), not carried from step to step
        return jax.lax.scan(lambda s, _: one(s, data), state, None, length=length_marker.shape[0])

    # The length is carried by an argument's shape so jit specialises on it without retracing the
    # Python function for every call; image data is an argument, not a constant baked into the program.
    data = task_data(config) if phase == "maml" else None
    if data is not None:
        data = distributed.put_replicated(data, mesh)
        if jax.default_backend() == "cpu":
            # XLA's CPU backend runs convolutions inside a compiled loop about 3x slower than the same
            # step compiled alone (Conv-4, Omniglot shapes: 0.86 vs 2.46 meta-steps/s on 2 cores), so on
            # CPU image chunks are a Python loop over the jitted step; the same steps on the same keys.
            one_jit = jax.jit(one)

            def looped(state: TrainState, length: int):
                metrics = []
                for _ in range(length):
                    state, m = one_jit(state, data)
                    metrics.append(m)
                return state, jax.tree.map(lambda *a: jnp.stack(a), *metrics)

            return looped
    return lambda state, length: _chunk(state, jnp.zeros((length,), jnp.int8), data)


# ---- progress --------------------------------------------------------------------------------

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
        text = (f"{self.label} {step}/{self.total} ({100 * frac:.0f}%) | {rate:,.0f} steps/s | "
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


# ---- the loop --------------------------------------------------------------------------------

class _StopFlag:
    """Catches SIGINT/SIGTERM while installed; the loop checks it between chunks."""

    def __init__(self):
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is not None:
            if signum == self.signum and now - self._at < 2.0:
                return  # the same request twice (the process group and a supervising parent)
            raise KeyboardInterrupt  # a second request: stop now
        self.signum, self._at = signum, now

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(path: str, keep_steps: dict[str, int]) -> None:
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


def _divergence(step0: int, metrics: dict[str, np.ndarray], max_loss_ratio: float) -> str | None:
    """Describes the divergence in a chunk's metrics (naming the step and tasks), or None."""
    loss, gnorm, pre = metrics["meta_loss"], metrics["grad_norm"], metrics["pre_adapt_loss"]
    bad = ~(np.isfinite(loss) & np.isfinite(gnorm))
    if bad.any():
        i = int(np.argmax(bad))
        tasks = np.flatnonzero(~np.isfinite(metrics["task_losses"][i])).tolist()
        which = f"tasks {tasks} of the meta-batch" if tasks else "the meta-gradient"
        return (f"non-finite meta-loss or gradient at step {step0 + i + 1} (meta-loss {loss[i]}, "
                f"gradient norm {gnorm[i]}; non-finite in {which})")
    ratio = float(np.mean(loss) / max(float(np.mean(pre)), 1e-30))
    if ratio > max_loss_ratio:
        worst = int(np.argmax(loss / np.maximum(pre, 1e-30)))
        tasks = metrics["task_losses"][worst]
        top = np.argsort(tasks)[::-1][:3].tolist()
        return (f"exploding inner loop over steps {step0 + 1}-{step0 + len(loss)}: the adapted query "
                f"loss averages {np.mean(loss):.4g}, {ratio:.3g} times the un-adapted loss "
                f"{np.mean(pre):.4g} (max_loss_ratio {max_loss_ratio:g}); worst at step "
                f"{step0 + worst + 1}, tasks {top} of the meta-batch")
    return None


def run_phase(config: TrainConfig, run_dir: str, phase: str, *, resume: bool,
              stop_at_step: int | None = None, stream: TextIO | None = None,
              stop_flag: _StopFlag | None = None, mesh: Mesh | None = None) -> TrainState:
    """Trains one phase to ``config.steps`` with checkpoints; returns the final state.

    In a multi-process job every process runs this; process 0 reads the checkpoint and broadcasts
    it, and alone writes checkpoints, metrics and progress.

    Raises:
      DivergenceError: on a non-finite meta-loss or gradient (the last good state is kept).
      Interrupted: on a signal or at ``stop_at_step``, after writing a checkpoint.
    """
    ckpt = os.path.join(run_dir, f"{phase}.ckpt.npz")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    writer = distributed.is_writer()
    state = initial_state(config, phase)
    if writer and resume and os.path.exists(ckpt):
        state, _ = checkpoint.restore(ckpt, state)
    state = distributed.broadcast_from_writer(state)
    saved_step = step = int(state.step)
    if step >= config.steps:
        return state
    state = distributed.put_replicated(state, mesh)
    chunk = make_chunk(config, phase, mesh)
    progress = Progress(phase, config.steps, step, stream)

    def save(state: TrainState, step: int) -> None:
        if writer:
            checkpoint.save(ckpt, distributed.to_host(state), step=step, extra={"phase": phase})

    L = config.log_every
    while step < config.steps:
        if stop_flag is not None and stop_flag.signum is not None:
            save(state, step)
            name = signal.Signals(stop_flag.signum).name
            raise Interrupted(f"{name} received: stopped {phase} at step {step}/{config.steps}; "
                              f"checkpoint saved", stop_flag.signum)
        if stop_at_step is not None and step >= stop_at_step:
            save(state, step)
            raise Interrupted(f"stopped {phase} at step {step} as asked; checkpoint saved")
        length = min(L - step % L, config.steps - step)  # chunks aligned to multiples of L
        t0 = time.perf_counter()
        new_state, metrics = chunk(state, length)
        metrics = distributed.to_host(metrics)
        dt = time.perf_counter() - t0
        msg = _divergence(step, metrics, config.max_loss_ratio if phase == "maml" else math.inf)
        if msg is not None:
            if step > saved_step or (writer and not os.path.exists(ckpt)):
                save(state, step)
                saved_step = step
            what = ALGORITHM_LABELS[config.algo] if phase == "maml" else phase
            hint = f"Try a smaller inner rate (now {config.inner_lr}) or meta rate (now {config.meta_lr})"
            if phase == "maml" and config.algo in LEARNED_RATES:
                hint += (f", or a smaller meta rate for the learned inner rates (rate_meta_lr, now "
                         f"{config.meta_lr if config.rate_meta_lr is None else config.rate_meta_lr})")
            raise DivergenceError(f"{what} training diverged: {msg}. The last good state "
                                  f"(step {saved_step}) is kept in {ckpt}. {hint}.")
        state, step = new_state, step + length
        record = {"phase": phase, "step": step, "meta_loss": float(np.mean(metrics["meta_loss"])),
                  "meta_loss_last": float(metrics["meta_loss"][-1]),
                  "grad_norm": float(np.mean(metrics["grad_norm"])), "steps_per_s": length / dt}
        if writer:
            _append_jsonl(metrics_path, record)
            progress.update(step, record["meta_loss"], record["steps_per_s"], final=step >= config.steps)
        if step % config.checkpoint_every == 0 or step >= config.steps:
            save(state, step)
            saved_step = step
    return state


def _run_info(config: TrainConfig) -> dict[str, Any]:
    return {"config": config.to_dict(), "task": config.task, "algorithm": config.algorithm_settings(),
            "versions": {"jax": jax.__version__, "optax": optax.__version__,
                         "python": sys.version.split()[0]},
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
        ckpt = os.path.join(run_dir, f"{phase}.ckpt.npz")
        if not os.path.exists(ckpt) or checkpoint.read_header(ckpt)["step"] < config.steps:
            return False
    return True


def prepare_run_dir(config: TrainConfig, run_dir: str, *, resume: bool = False,
                    overwrite: bool = False) -> str:
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
        diff = {k: (v, getattr(config, k)) for k, v in old.to_dict().items()
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
            with open(cfg_path, "w", encoding="utf-8") as f:
                json.dump(_run_info(config), f, indent=2)
        return "complete" if is_complete(run_dir, config) else "resume"
    if resume and os.path.isdir(run_dir) and os.listdir(run_dir):
        raise ValueError(f"--resume: {run_dir} holds no jmaml run (no config.json)")
    os.makedirs(run_dir, exist_ok=True)
    if os.listdir(run_dir) and not overwrite:
        raise ValueError(f"output dir {run_dir} is not empty and holds no jmaml run; "
                         "choose an empty or new folder")
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(_run_info(config), f, indent=2)
    return "new"


_MODES = ("new", "resume", "complete")


def train(config: TrainConfig, run_dir: str, *, resume: bool = False, overwrite: bool = False,
          stop_at_step: int | None = None, stream: TextIO | None = None,
          mesh: Mesh | None = None) -> dict[str, TrainState]:
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

    Returns:
      ``{"maml": state, "pretrained": state}`` (the latter only with ``config.pretrain``).

    Raises:
      ValueError: bad settings or a run dir holding a different run.
      checkpoint.CheckpointError: a corrupted checkpoint on resume (nothing is overwritten).
      DivergenceError, Interrupted: see ``run_phase``.
      distributed.DistributedError: the processes of a distributed job disagree on the settings.
    """
    config.validate()
    if mesh is not None:
        distributed.check_divisible(config.meta_batch_size, mesh)
    distributed.check_same_everywhere("the training settings", json.dumps(
        [config.to_dict(), os.path.abspath(run_dir), resume, overwrite, stop_at_step]))
    writer = distributed.is_writer()
    mode, refusal = "new", None
    if writer:
        try:
            mode = prepare_run_dir(config, run_dir, resume=resume, overwrite=overwrite)
        except ValueError as e:
            refusal = e
    code = distributed.broadcast_int(-1 if refusal else _MODES.index(mode))
    if code < 0:
        if refusal is not None:
            raise refusal
        raise distributed.DistributedError(f"process 0 refused the run dir {run_dir} (its error says why)")
    mode = _MODES[code]
    if writer and mode != "new":  # check every checkpoint before writing anything
        keep = {}
        for phase in PHASES:
            ckpt = os.path.join(run_dir, f"{phase}.ckpt.npz")
            if os.path.exists(ckpt):
                checkpoint.restore(ckpt, initial_state(config, phase))
                keep[phase] = checkpoint.read_header(ckpt)["step"]
        if mode == "resume":
            if keep.get("maml", 0) < config.steps:
                keep.pop("pretrained", None)
            _trim_metrics(os.path.join(run_dir, "metrics.jsonl"), keep)
    states = {}
    with _StopFlag() as flag:
        for phase in config.phases():
            states[phase] = run_phase(config, run_dir, phase, resume=mode != "new",
                                      stop_at_step=stop_at_step, stream=stream, stop_flag=flag, mesh=mesh)
    return states


def load_params(run_dir: str, phase: str = "maml") -> Any:
    """The trained parameters of a phase from a run dir's checkpoint."""
    config = load_config(run_dir)
    state, _ = checkpoint.restore(os.path.join(run_dir, f"{phase}.ckpt.npz"), initial_state(config, phase))
    return state.params
