"""From a ``TrainConfig`` to the engine's parts: the model, the learner, the task distribution, the
meta-optimiser and the initial state of each phase. Registries only; no training loop here, so
evaluation, plots and sweeps build their model without importing the loop.
"""

from __future__ import annotations

import functools

import jax
import optax

from jmaml import learners, tasks
from jmaml.core.meta import TrainState
from jmaml.core.protocols import MetaLearner, TaskDistribution
from jmaml.core.types import LossFn, Model
from jmaml.engine.loop import initial_state as engine_initial_state
from jmaml.run.config import BASELINE, OPTIMISERS, TrainConfig

AUTO_UNROLL_MAX_K = 8


def effective_unroll(unroll: int | bool | None, num_inner_steps: int) -> int | bool:
    """Resolves ``unroll=None`` (auto): fully unrolled for k <= 8, a rolled scan beyond."""
    if unroll is None:
        return True if num_inner_steps <= AUTO_UNROLL_MAX_K else 1
    return unroll


def build_model(config: TrainConfig, phase: str | None = None) -> tuple[Model, LossFn]:
    """The model and training loss a config describes for a phase (``TrainConfig.model_and_loss``: the
    task family's default model, as the phase's learner needs it; the baseline is the plain model)."""
    return config.model_and_loss(baseline=phase == BASELINE)


def build_learner(config: TrainConfig, loss_fn: LossFn | None = None, phase: str | None = None) -> MetaLearner:
    """The phase's learner on ``loss_fn`` (default: the config's training loss): the config's
    algorithm, or for the baseline plain regression on the query points (MAML with k = 0)."""
    if loss_fn is None:
        loss_fn = build_model(config, phase)[1]
    if phase == BASELINE:
        return learners.maml(loss_fn, inner_lr=config.inner_lr, num_inner_steps=0)._replace(
            name=BASELINE, label=BASELINE)
    return learners.make(config.algo, loss_fn, inner_lr=config.inner_lr, num_inner_steps=config.num_inner_steps,
                         options=config.options, run_steps=config.steps, remat=config.remat,
                         unroll=effective_unroll(config.unroll, config.num_inner_steps))


@functools.lru_cache(maxsize=8)
def build_tasks(config: TrainConfig) -> TaskDistribution:
    """The config's task distribution (cached: image families decode their dataset once per process)."""
    return tasks.family(config.task).distribution(config)


def build_optimiser(config: TrainConfig, phase: str | None = None) -> optax.GradientTransformation:
    """The meta-optimiser of a phase: ``config.optimiser`` at ``meta_lr``, or the learner's own
    combination (learned inner rates at ``rate_meta_lr``)."""
    make = OPTIMISERS[config.optimiser]
    if phase == BASELINE:
        return make(config.meta_lr)
    return learners.meta_optimiser(config.algo, make, config.meta_lr, config.options)


@functools.lru_cache(maxsize=16)
def phase_parts(config: TrainConfig, phase: str) -> tuple[MetaLearner, TaskDistribution, optax.GradientTransformation]:
    """The (learner, tasks, optimiser) a phase trains with; cached, so a resumed or repeated run in one
    process reuses the engine's compiled chunk."""
    return build_learner(config, phase=phase), build_tasks(config), build_optimiser(config, phase)


def initial_params(config: TrainConfig, phase: str | None = None):
    """The model's initial parameters: both phases start from the same draw."""
    model, _ = build_model(config, phase)
    return model.init(jax.random.split(jax.random.key(config.seed))[0])


def task_stream_key(config: TrainConfig, phase: str | None = None) -> jax.Array:
    """The key a phase's training tasks are drawn from (each step splits it)."""
    seed = config.seed if config.task_seed is None else config.task_seed
    return jax.random.fold_in(jax.random.split(jax.random.key(seed))[1], 1 if phase == BASELINE else 0)


def initial_state(config: TrainConfig, phase: str | None = None) -> TrainState:
    """The step-0 state of a phase (the meta-learning phase adds what its algorithm learns besides the
    model's parameters, e.g. Meta-SGD's rates)."""
    phase = phase or config.algo
    learner, _, optimiser = phase_parts(config, phase)
    return engine_initial_state(learner, initial_params(config, phase), optimiser, task_stream_key(config, phase))
