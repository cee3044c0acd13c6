"""``TrainConfig``: the settings of a ``jmaml train`` run, resolved through registries.

Thin by design: the task family (``jmaml.tasks.FAMILIES``), the algorithm (``jmaml.learners.REGISTRY``)
and the meta-optimiser (``OPTIMISERS``) are names looked up there, and each algorithm's own options
(``algo_options``) are declared, checked and defaulted by the algorithm's module. The defaults are the
MAML paper's sinusoid settings (Section 5.1).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import optax

from jmaml import learners, tasks
from jmaml.core._checks import check_num_steps, check_positive_int, check_rate, check_seed
from jmaml.core.flags import ints, setting
from jmaml.core.losses import make_loss
from jmaml.core.models import ACTIVATIONS, PRECISIONS, mixed_precision
from jmaml.core.types import LossFn, Model
from jmaml.learners import BASELINE


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
# Before algorithms owned their options, they were TrainConfig fields of these names; run dirs
# written then still load (from_dict moves them into algo_options).
_LEGACY_ALGO_FIELDS = {"first_order": False, "imaml_lambda": 1.0, "imaml_cg_iters": 5, "mamlpp_msl": True,
                       "mamlpp_msl_anneal_steps": None, "mamlpp_first_order_steps": 0, "rate_meta_lr": None}


# the sections of `jmaml train --help` the fields' flags go in
MODEL, MAML, ALGORITHM, RUN = "model and task", "MAML", "algorithm", "run"


def block_size(text: str) -> int | str:
    """``--meta-batch-block``'s argument: a number of tasks, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tasks or auto, got {text!r}") from None


def _freeze(options: Any) -> tuple[tuple[str, Any], ...]:
    if isinstance(options, Mapping):
        options = options.items()
    try:
        return tuple(sorted((str(k), v) for k, v in options))
    except (TypeError, ValueError):
        raise TypeError(f"algo_options must be a dict of option names to values, got {options!r}") from None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Meta-training settings; the defaults are the MAML paper's sinusoid settings (Section 5.1)."""

    hidden: tuple[int, ...] = setting((40, 40), "hidden widths", parse=ints, group=MODEL)  # MLP 1-40-40-1
    activation: str = setting("relu", "relu (default), tanh, sigmoid, gelu, silu, identity", group=MODEL)
    num_support: int = setting(10, "K support points per task (per class on image tasks)", name="shots",
                               parse=int, group=MODEL)  # K
    num_query: int = setting(10, "query points per task", name="query_shots", parse=int, group=MODEL)
    # α: the MAML reference code's sinusoid rate (its default update_lr); the paper's text says 0.01, at
    # which the learned θ sits past the inner loop's stability edge (experiments/sinusoid/FIDELITY.md)
    inner_lr: float = setting(1e-3, "inner rate alpha (default 0.001, as the MAML reference code runs sinusoids; "
                                     "the paper's text says 0.01: see experiments/sinusoid/FIDELITY.md)",
                              parse=float, group=MAML)
    num_inner_steps: int = setting(1, "inner steps k", name="inner_steps", aliases=("k",), parse=int,
                                   group=MAML)  # k
    meta_lr: float = setting(1e-3, "meta rate beta", parse=float, group=MAML)  # β
    optimiser: str = setting("adam", "adam (default), adamw, sgd, momentum, rmsprop", group=MAML)
    meta_batch_size: int = setting(25, "tasks per meta-step", parse=int, group=MAML)
    loss: str = setting("mse", "mse (default) or sse", group=MODEL)
    steps: int = setting(70_000, "meta-steps", parse=int, group=MAML)
    seed: int = setting(0, "random seed", parse=int, group=MAML)  # initial parameters (and tasks, unless task_seed)
    task_seed: int | None = None  # the stream of training tasks; None: derived from seed
    # The meta-learning algorithm (a jmaml.learners.REGISTRY name) and its own options by name
    # (e.g. {"imaml_lambda": 2.0}); see `jmaml train --help` or each learner module's OPTIONS.
    algo: str = setting("maml", "maml (default), fomaml, reptile, metasgd (learned per-parameter rates), anil (only "
                                "the last layer adapts), mamlpp (MAML++), imaml (implicit gradients), cavia (context "
                                "parameters adapted, the network shared)", choices=tuple(learners.names()),
                        group=ALGORITHM)
    algo_options: Any = ()
    # rematerialise inner steps on the backward pass (memory for long k)
    remat: bool = setting(False, "rematerialise inner steps on the backward pass (memory for long inner loops)",
                          const=True, group=MAML)
    # Inner-loop unrolling: None = auto (straight-line code for k <= 8, measured faster on CPU and
    # GPU; a rolled lax.scan beyond, whose compile time does not grow with k); or as jmaml.adapt.
    unroll: int | bool | None = None
    checkpoint_every: int = setting(5_000, "steps between checkpoints", parse=int, group=RUN)
    # steps per jitted chunk, and per metrics line
    log_every: int = setting(1_000, "steps per compiled chunk and per metrics line", parse=int, group=RUN)
    # also train the "pretrained" regression baseline (where the task family has one)
    pretrain: bool = setting(True, "skip the pretrained-regression baseline", name="no_pretrain", const=False,
                             group=MAML)
    # The task family (a jmaml.tasks.FAMILIES name): sinusoid regression, or few-shot classification
    # from image folders (jmaml.tasks.images).
    task: str = setting("sinusoid", "sinusoid regression (default), or few-shot classification from an image "
                                    "folder with the MAML paper's settings as defaults (Omniglot 5-way: alpha 0.4, "
                                    "1 step, 3 at test, 32 tasks; 20-way: 0.1, 5, 5, 16; miniImageNet, "
                                    "tieredImageNet, CIFAR-FS, FC100: 0.01, 5, 10, 4 (1-shot) / 2; 15 query images "
                                    "per class)", choices=tuple(tasks.FAMILIES), group=MODEL)
    data_dir: str | None = setting(None, "the dataset's folder (Omniglot: images_background/..., miniImageNet and "
                                         "tieredImageNet: train/CLASS/..., CIFAR-FS and FC100: CIFAR-100's "
                                         "CLASS/*.png folders)", metavar="PATH", group=MODEL)
    cache_dir: str | None = setting(None, "where the decoded-image cache goes (default: DATA_DIR/.jmaml_cache; for "
                                          "read-only datasets)", metavar="PATH", group=MODEL)
    ways: int = setting(5, "N classes per episode (image tasks)", parse=int, group=MODEL)
    image_size: int | None = setting(None, "resize images to this (default 28 Omniglot, 32 CIFAR, 84 ImageNet)",
                                     parse=int, group=MODEL)
    backbone: str = setting("conv4", "image tasks: conv4 (default; the MAML paper's) or resnet12 (64-160-320-640)",
                            choices=("conv4", "resnet12"), group=MODEL)
    # "bf16": the model's forward and backward passes in bfloat16, parameters, optimiser state and the
    # meta-gradient in float32 (jmaml.models.mixed_precision); "float32": all float32
    precision: str = setting("float32", "bf16: the model's forward and backward passes in bfloat16, parameters, "
                                        "optimiser state and meta-gradient in float32 (default float32)",
                             choices=tuple(PRECISIONS), group=MODEL)
    num_train_classes: int = setting(1200, "Omniglot: characters for meta-training, the rest are test classes",
                                     parse=int, group=MODEL)
    eval_inner_steps: int = setting(10, "inner steps at test time (default 10; image tasks: the preset's)",
                                    parse=int, group=MODEL)
    # Stop at the first step whose adapted query loss is more than this many times its un-adapted one: the
    # inner loop is exploding (the seed's -1515.48, at scale; jmaml.engine.diverged_steps). inf disables.
    max_loss_ratio: float = 1000.0
    # tasks per block of the meta-batch (jmaml.blocking): an int dividing meta_batch_size, "auto" (timed on the
    # first compile, kept on resume) or None (the whole meta-batch at once)
    meta_batch_block: int | str | None = setting(
        None, "process each meta-batch in blocks of N tasks (the same gradient to float round-off, a working set "
              "that stays in cache); auto: time a few sizes on the first compile and keep the fastest (a resume "
              "keeps it); default: the whole meta-batch at once", parse=block_size, metavar="N|auto", group=MODEL)

    def __post_init__(self) -> None:
        object.__setattr__(self, "algo_options", _freeze(self.algo_options))

    @property
    def options(self) -> dict[str, Any]:
        """``algo_options`` as a dict."""
        return dict(self.algo_options)

    def validate(self) -> TrainConfig:
        """Checks every field; returns self. Raises ValueError/TypeError naming the field."""
        for name in ("pretrain", "remat"):  # strict: "false" in a config.json is not false
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("task", "algo", "optimiser", "activation", "loss", "backbone", "precision"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("data_dir", "cache_dir"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a path string, got {getattr(self, name)!r}")
        if not isinstance(self.hidden, tuple) or not self.hidden:
            raise ValueError(f"hidden must be a non-empty tuple of widths, got {self.hidden!r}")
        for i, h in enumerate(self.hidden):
            check_positive_int(h, f"hidden[{i}]")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.optimiser not in OPTIMISERS:
            raise ValueError(f"optimiser must be one of {sorted(OPTIMISERS)}, got {self.optimiser!r}")
        for name in ("num_support", "num_query", "meta_batch_size", "steps", "checkpoint_every",
                     "log_every"):
            check_positive_int(getattr(self, name), name)
        check_num_steps(self.num_inner_steps, "num_inner_steps")
        family = tasks.family(self.task)
        check_positive_int(self.eval_inner_steps, "eval_inner_steps")
        family.validate(self)
        self._validate_algorithm()
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
        if self.meta_batch_block != "auto":
            from jmaml.engine.blocking import check_block
            check_block(self.meta_batch_block, self.meta_batch_size)
        if self.checkpoint_every % self.log_every:
            raise ValueError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of "
                             f"log_every ({self.log_every}): checkpoints are written between chunks")
        return self

    def _validate_algorithm(self) -> None:
        spec = learners.spec(self.algo)
        learners.check_options(self.algo, self.options)
        if self.num_inner_steps < spec.min_inner_steps:
            raise ValueError(f"algo {self.algo!r} needs num_inner_steps >= {spec.min_inner_steps}, "
                             f"got {self.num_inner_steps}")
        # the factory's own checks (e.g. remat where it is not available), on a stand-in loss -- or, for a
        # backend that reads the model (fused), on the real one
        # the family's model must take the learner's extra inputs; a backend that reads the model (fused)
        # checks it here, before any run starts
        learners.make(self.algo, self.model_and_loss()[1], inner_lr=self.inner_lr,
                      num_inner_steps=self.num_inner_steps, options=self.options, run_steps=self.steps,
                      remat=self.remat)

    def model_and_loss(self, baseline: bool = False) -> tuple[Model, LossFn]:
        """The model and training loss this config describes: the task family's default model, as the
        algorithm needs it (CAVIA adds context inputs; the ``baseline`` is the plain model), in the
        config's precision (``jmaml.recipes.build_model`` by phase)."""
        family = tasks.family(self.task)
        if baseline:
            model = family.model(self, 0)
        else:
            extra = learners.extra_inputs(self.algo, self.options)
            model = learners.wrap_model(self.algo, family.model(self, extra), self.options)
        model = mixed_precision(model, self.precision)
        return model, make_loss(model.apply, family.loss(self))

    def phases(self) -> tuple[str, ...]:
        """The phases a run trains: the meta-learner (named after its algorithm), and the pretrained
        baseline where the task family has one and ``pretrain`` asks for it."""
        if self.pretrain and tasks.family(self.task).baseline:
            return (self.algo, BASELINE)
        return (self.algo,)

    def algorithm_settings(self) -> dict[str, Any]:
        """The settings the chosen algorithm actually uses, with defaults resolved (for the run dir)."""
        out: dict[str, Any] = {"algo": self.algo, "inner_lr": self.inner_lr, "num_inner_steps": self.num_inner_steps}
        opts = learners.resolve_options(self.algo, self.options, self.steps)
        if "rate_meta_lr" in opts and opts["rate_meta_lr"] is None:
            opts["rate_meta_lr"] = self.meta_lr
        return {**out, **opts, **learners.spec(self.algo).implied}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["algo_options"] = dict(self.algo_options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from ``to_dict``'s form; also reads run dirs written before algorithms owned
        their options (their fields move into ``algo_options``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        legacy = {k: d.pop(k) for k in list(d) if k in _LEGACY_ALGO_FIELDS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
        options = dict(d.get("algo_options") or {})
        algo = d.get("algo", cls.algo)  # checked (type, name) by validate, with the other fields
        implied = learners.spec(algo).implied if isinstance(algo, str) and algo in learners.REGISTRY else {}
        for k, v in legacy.items():
            if v != _LEGACY_ALGO_FIELDS[k] and implied.get(k, _LEGACY_ALGO_FIELDS[k]) != v:
                options.setdefault(k, v)
        d["algo_options"] = options
        if "hidden" in d:
            if not isinstance(d["hidden"], (list, tuple)):
                raise ValueError(f"hidden must be a list of layer widths like [40, 40], got {d['hidden']!r}")
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)
