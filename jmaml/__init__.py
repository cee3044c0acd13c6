"""jmaml: a functional JAX toolkit for gradient-based meta-learning (MAML and its family).

Three open protocols and one engine: a ``Model(init, apply)``, a ``TaskDistribution`` (sample,
held-out tasks, metric) and a ``MetaLearner`` (init, estimate, adapt); ``fit`` meta-trains any
combination, ``evaluation.evaluate`` scores it on held-out tasks (``evaluate``: the paper's protocol
and run folders), ``check_meta_gradient`` checks a learner's gradient against finite differences.
The built-in tasks and algorithms are instances.
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Loaded on first use (PEP 562), so that `import jmaml` and the `jmaml` command start without importing
# JAX: the command installs its signal handler first, and a signal during start-up is not lost.
_MODULES = ("adapters", "analytic", "blocking", "checkpoint", "config", "diagnostics", "distributed", "engine",
            "estimators", "evaluate", "evaluation", "fingerprint", "fused", "gradcheck", "inner", "inner_optimisers",
            "learners", "losses", "meta", "models", "plot", "population", "protocols", "recipes", "rl", "rundir",
            "runinfo", "runstore", "sweep", "tasks", "train", "types", "walkthrough", "writers")
_NAMES = {
    "TrainConfig": "config", "DivergenceError": "engine", "Interrupted": "engine", "fit": "engine",
    "Logging": "engine", "RunDir": "engine", "fit_population": "population", "evaluate_population": "evaluation",
    "check_meta_gradient": "gradcheck", "adapt": "inner", "inner_step": "inner", "make_loss": "losses",
    "TrainState": "meta", "batched_objective": "meta", "init_state": "meta", "make_estimator_step": "meta",
    "make_step": "meta", "maml_value_and_grad": "meta", "task_objective": "meta",
    "REQUIRED_METRICS": "protocols", "MetaLearner": "protocols", "TaskDistribution": "protocols",
    "ApplyStep": "protocols", "apply_step": "protocols",
    "Batch": "types", "Model": "types", "Task": "types",
}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(f"jmaml.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(f"jmaml.{_NAMES[name]}"), name)
    else:
        raise AttributeError(f"module 'jmaml' has no attribute {name!r}")
    globals()[name] = value  # looked up once; tools that read the module's namespace then see it
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from jmaml import (  # noqa: F401
        adapters,
        analytic,
        checkpoint,
        diagnostics,
        distributed,
        engine,
        estimators,
        evaluate,
        evaluation,
        fingerprint,
        inner_optimisers,
        learners,
        losses,
        models,
        population,
        recipes,
        rundir,
        runinfo,
        runstore,
        sweep,
        tasks,
        train,
        writers,
    )
    from jmaml.config import TrainConfig  # noqa: F401
    from jmaml.engine import DivergenceError, Interrupted, Logging, RunDir, fit  # noqa: F401
    from jmaml.evaluation import evaluate_population  # noqa: F401
    from jmaml.gradcheck import check_meta_gradient  # noqa: F401
    from jmaml.inner import adapt, inner_step  # noqa: F401
    from jmaml.losses import make_loss  # noqa: F401
    from jmaml.meta import (  # noqa: F401
        TrainState,
        batched_objective,
        init_state,
        make_estimator_step,
        make_step,
        maml_value_and_grad,
        task_objective,
    )
    from jmaml.population import fit_population  # noqa: F401
    from jmaml.protocols import REQUIRED_METRICS, ApplyStep, MetaLearner, TaskDistribution, apply_step  # noqa: F401
    from jmaml.types import Batch, Model, Task  # noqa: F401

__all__ = [
    "REQUIRED_METRICS",
    "ApplyStep",
    "RunDir",
    "Batch",
    "DivergenceError",
    "Interrupted",
    "Logging",
    "MetaLearner",
    "Model",
    "Task",
    "TaskDistribution",
    "TrainConfig",
    "TrainState",
    "adapt",
    "analytic",
    "apply_step",
    "batched_objective",
    "check_meta_gradient",
    "checkpoint",
    "diagnostics",
    "distributed",
    "engine",
    "estimators",
    "evaluate",
    "evaluation",
    "evaluate_population",
    "fit",
    "fit_population",
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
    "runinfo",
    "task_objective",
    "tasks",
    "writers",
]
