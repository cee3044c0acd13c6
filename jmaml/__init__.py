"""jmaml: a functional JAX toolkit for gradient-based meta-learning (MAML and its family).

Three open protocols and one engine: a ``Model(init, apply)``, a ``TaskDistribution`` (sample,
held-out tasks, metric) and a ``MetaLearner`` (init, estimate, adapt); ``fit`` meta-trains any
combination, ``evaluate.evaluate`` scores it by the paper's protocol, ``check_meta_gradient`` checks a
learner's gradient against finite differences. The built-in tasks and algorithms are instances.
"""

from jmaml import (
    analytic,
    checkpoint,
    diagnostics,
    distributed,
    engine,
    estimators,
    evaluate,
    learners,
    losses,
    models,
    recipes,
    rundir,
    sweep,
    tasks,
    train,
)
from jmaml.config import TrainConfig
from jmaml.engine import DivergenceError, Interrupted, fit
from jmaml.gradcheck import check_meta_gradient
from jmaml.inner import adapt, inner_step
from jmaml.losses import make_loss
from jmaml.meta import (
    TrainState,
    batched_objective,
    init_state,
    make_estimator_step,
    make_step,
    maml_value_and_grad,
    task_objective,
)
from jmaml.protocols import REQUIRED_METRICS, MetaLearner, TaskDistribution
from jmaml.types import Batch, Model, Task

__version__ = "0.2.0"

__all__ = [
    "REQUIRED_METRICS",
    "Batch",
    "DivergenceError",
    "Interrupted",
    "MetaLearner",
    "Model",
    "Task",
    "TaskDistribution",
    "TrainConfig",
    "TrainState",
    "adapt",
    "analytic",
    "batched_objective",
    "check_meta_gradient",
    "checkpoint",
    "diagnostics",
    "distributed",
    "engine",
    "estimators",
    "evaluate",
    "fit",
    "sweep",
    "train",
    "init_state",
    "inner_step",
    "learners",
    "losses",
    "make_estimator_step",
    "make_loss",
    "make_step",
    "maml_value_and_grad",
    "models",
    "recipes",
    "rundir",
    "task_objective",
    "tasks",
]
