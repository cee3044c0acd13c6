"""jmaml: a functional JAX toolkit for gradient-based meta-learning (MAML and its family).

Three open protocols and one engine: a ``Model(init, apply)``, a ``TaskDistribution`` (sample,
held-out tasks, metric) and a ``MetaLearner`` (init, estimate, adapt); ``fit`` meta-trains any
combination, ``evaluation.evaluate`` scores it on held-out tasks (``evaluate``: the paper's protocol
and run folders), ``check_meta_gradient`` checks a learner's gradient against finite differences.
The built-in tasks and algorithms are instances.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from jmaml.core import moved as _moved

__version__ = "0.2.0"

# Loaded on first use (PEP 562), so that `import jmaml` and the `jmaml` command start without importing
# JAX: the command installs its signal handler first, and a signal during start-up is not lost.
# The modules live in layer folders (core, engine, run; jmaml.core.moved); their public names stay here.
_MODULES = {
    "adapters": "core.adapters", "analytic": "core.analytic", "blocking": "engine.blocking",
    "checkpoint": "engine.checkpoint", "config": "run.config", "diagnostics": "core.diagnostics",
    "distributed": "engine.distributed", "engine": "engine", "estimators": "core.estimators",
    "evaluate": "run.evaluate", "evaluation": "engine.evaluation", "fingerprint": "engine.fingerprint",
    "flags": "core.flags", "fused": "core.fused", "gradcheck": "engine.gradcheck", "inner": "core.inner",
    "inner_optimisers": "core.inner_optimisers", "learners": "learners", "losses": "core.losses",
    "meta": "core.meta", "models": "core.models", "plot": "run.plot", "population": "engine.population",
    "protocols": "core.protocols", "recipes": "run.recipes", "rl": "rl", "rundir": "run.rundir",
    "runinfo": "run.runinfo", "runs": "run.runs", "runstore": "engine.runstore", "sweep": "run.sweep",
    "tasks": "tasks", "train": "run.train", "types": "core.types", "walkthrough": "run.walkthrough",
    "writers": "engine.writers", "core": "core", "run": "run",
}
_NAMES = {
    "TrainConfig": "run.config", "DivergenceError": "engine.loop", "Interrupted": "engine.loop",
    "fit": "engine.loop", "Logging": "engine.loop", "RunDir": "engine.loop", "fit_population": "engine.population",
    "evaluate_population": "engine.evaluation", "check_meta_gradient": "engine.gradcheck", "adapt": "core.inner",
    "inner_step": "core.inner", "make_loss": "core.losses",
    "TrainState": "core.meta", "batched_objective": "core.meta", "init_state": "core.meta",
    "make_estimator_step": "core.meta", "make_step": "core.meta", "maml_value_and_grad": "core.meta",
    "task_objective": "core.meta",
    "REQUIRED_METRICS": "core.protocols", "MetaLearner": "core.protocols", "TaskDistribution": "core.protocols",
    "ApplyStep": "core.protocols", "apply_step": "core.protocols",
    "Batch": "core.types", "Model": "core.types", "Task": "core.types",
}


class _FormerPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import jmaml.sweep``, ``from jmaml.config import TrainConfig``, ``jmaml.rl.recipe``: a module's path
    from before the layer folders is the moved module itself (the same object, so a patch of one is a patch
    of the other)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname in _FORMER and fullname not in _REAL_PACKAGES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: Any) -> Any:
        return importlib.import_module(_FORMER[spec.name])

    def exec_module(self, module: Any) -> None:
        pass


_FORMER = _moved.MOVED
_REAL_PACKAGES = {"jmaml.engine"}  # the engine's folder has its former module's names (jmaml.engine.fit)
if not any(isinstance(f, _FormerPaths) for f in sys.meta_path):
    sys.meta_path.append(_FormerPaths())


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(f"jmaml.{_MODULES[name]}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(f"jmaml.{_NAMES[name]}"), name)
    else:
        raise AttributeError(f"module 'jmaml' has no attribute {name!r}")
    globals()[name] = value  # looked up once; tools that read the module's namespace then see it
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from jmaml import engine, learners, tasks  # noqa: F401
    from jmaml.core import (  # noqa: F401
        adapters,
        analytic,
        diagnostics,
        estimators,
        inner_optimisers,
        losses,
        models,
    )
    from jmaml.core.inner import adapt, inner_step  # noqa: F401
    from jmaml.core.losses import make_loss  # noqa: F401
    from jmaml.core.meta import (  # noqa: F401
        TrainState,
        batched_objective,
        init_state,
        make_estimator_step,
        make_step,
        maml_value_and_grad,
        task_objective,
    )
    from jmaml.core.protocols import (  # noqa: F401
        REQUIRED_METRICS,
        ApplyStep,
        MetaLearner,
        TaskDistribution,
        apply_step,
    )
    from jmaml.core.types import Batch, Model, Task  # noqa: F401
    from jmaml.engine import checkpoint, distributed, evaluation, fingerprint, population, runstore, writers  # noqa: F401
    from jmaml.engine.evaluation import evaluate_population  # noqa: F401
    from jmaml.engine.gradcheck import check_meta_gradient  # noqa: F401
    from jmaml.engine.loop import DivergenceError, Interrupted, Logging, RunDir, fit  # noqa: F401
    from jmaml.engine.population import fit_population  # noqa: F401
    from jmaml.run import evaluate, recipes, rundir, runinfo, sweep, train  # noqa: F401
    from jmaml.run.config import TrainConfig  # noqa: F401

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
