"""jmaml: a functional JAX toolkit for gradient-based meta-learning (MAML and its family)."""

from jmaml import analytic, diagnostics, estimators, losses, models, tasks
from jmaml.inner import adapt, inner_step
from jmaml.losses import make_loss
from jmaml.meta import (
    TrainState,
    batched_objective,
    init_state,
    make_step,
    maml_value_and_grad,
    task_objective,
)
from jmaml.types import Batch, Model, Task

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Model",
    "Task",
    "TrainState",
    "adapt",
    "analytic",
    "batched_objective",
    "diagnostics",
    "estimators",
    "init_state",
    "inner_step",
    "losses",
    "maml_value_and_grad",
    "make_loss",
    "make_step",
    "models",
    "task_objective",
    "tasks",
]
