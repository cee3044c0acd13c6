"""Layer 2, the engine: the training loop (``loop``: ``fit``, ``RunDir``, ``Logging``, divergence, signals,
progress), populations (``population``), blocking, devices (``distributed``), checkpoints, fingerprints and
the run-dir store (``runstore``), metric writers, evaluation as a library (``evaluation``,
``rl_evaluation``) and the meta-gradient check (``gradcheck``).

``jmaml.engine.NAME`` is the loop's ``NAME`` (``jmaml.engine.fit``, ``from jmaml.engine import RunDir``), as
before the engine was a folder; loaded on first use, so that importing a module of this folder (the signal
handler the command installs before JAX) does not import JAX.
"""

import importlib
from typing import Any

_SUBMODULES = ("loop", "population", "blocking", "distributed", "runstore", "checkpoint", "fingerprint", "writers",
               "_signals", "gradcheck", "evaluation", "rl_evaluation")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"jmaml.engine.{name}")
    if name.startswith("__"):
        raise AttributeError(name)
    loop = importlib.import_module("jmaml.engine.loop")
    try:
        return getattr(loop, name)
    except AttributeError:
        raise AttributeError(f"module 'jmaml.engine' has no attribute {name!r}") from None
