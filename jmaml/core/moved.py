"""Where each module of jmaml's former flat layout lives in the layer folders (``core``, ``engine``, ``run``).

Two uses: ``import jmaml.sweep``, ``from jmaml.config import TrainConfig`` and the rest of the former paths keep
working (``jmaml/__init__.py`` aliases them to the moved modules), and run fingerprints name functions by their
former modules (``jmaml.engine.fingerprint``), so a run folder written before the move resumes after it.
Plain data: importing it imports nothing.
"""

MOVED = {
    "jmaml.types": "jmaml.core.types",
    "jmaml._util": "jmaml.core._util",
    "jmaml._checks": "jmaml.core._checks",
    "jmaml.analytic": "jmaml.core.analytic",
    "jmaml.protocols": "jmaml.core.protocols",
    "jmaml.inner_optimisers": "jmaml.core.inner_optimisers",
    "jmaml.inner": "jmaml.core.inner",
    "jmaml.meta": "jmaml.core.meta",
    "jmaml.losses": "jmaml.core.losses",
    "jmaml.models": "jmaml.core.models",
    "jmaml.diagnostics": "jmaml.core.diagnostics",
    "jmaml.adapters": "jmaml.core.adapters",
    "jmaml.estimators": "jmaml.core.estimators",
    "jmaml.fused": "jmaml.core.fused",
    "jmaml.population": "jmaml.engine.population",
    "jmaml.blocking": "jmaml.engine.blocking",
    "jmaml.distributed": "jmaml.engine.distributed",
    "jmaml.runstore": "jmaml.engine.runstore",
    "jmaml.checkpoint": "jmaml.engine.checkpoint",
    "jmaml.fingerprint": "jmaml.engine.fingerprint",
    "jmaml.writers": "jmaml.engine.writers",
    "jmaml._signals": "jmaml.engine._signals",
    "jmaml.gradcheck": "jmaml.engine.gradcheck",
    "jmaml.evaluation": "jmaml.engine.evaluation",
    "jmaml.config": "jmaml.run.config",
    "jmaml.recipes": "jmaml.run.recipes",
    "jmaml.rundir": "jmaml.run.rundir",
    "jmaml.runinfo": "jmaml.run.runinfo",
    "jmaml.evaluate": "jmaml.run.evaluate",
    "jmaml.train": "jmaml.run.train",
    "jmaml.sweep": "jmaml.run.sweep",
    "jmaml.plot": "jmaml.run.plot",
    "jmaml.walkthrough": "jmaml.run.walkthrough",
    "jmaml.engine": "jmaml.engine.loop",
    "jmaml.rl.evaluation": "jmaml.engine.rl_evaluation",
    "jmaml.rl.recipe": "jmaml.run.rl_recipe",
}
FORMER = {new: old for old, new in MOVED.items()}
