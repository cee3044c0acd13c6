"""Where the engine's per-chunk metrics go: pluggable metric writers.

After every compiled chunk, ``jmaml.fit`` builds one *record*: a flat dict with the run's
``phase`` (its name), the ``step`` reached, the chunk's mean of every scalar the learner reports
(``meta_loss``, ``grad_norm``, ``pre_adapt_loss``, ``task_losses``, ...), ``meta_loss_last``,
``steps_per_s`` and ``wall_time`` (seconds since the epoch); the first record of each start (a fresh
run or a resume) also has ``time_to_first_chunk_s``, the seconds from the training loop's start to
the end of its first chunk, compilation included. ``fit`` appends it to the run dir's
``metrics.jsonl`` (the run's own record, which resume and ``jmaml eval``/``plot`` read) and hands
it to every writer in ``writers=``:

- :class:`JsonlWriter`: one JSON line per record, to any file;
- :class:`TensorBoardWriter`: TensorBoard event files (``pip install 'jmaml[tensorboard]'``),
  one scalar series per metric, tagged ``PHASE/METRIC``;
- :class:`CallbackWriter`: calls your function with each record (to send it anywhere: wandb,
  a dashboard, a list in a notebook).

Any object with ``write(record)`` and ``flush()`` methods is a writer (:class:`MetricWriter`).
Only process 0 of a multi-process job writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

Record = dict[str, Any]  # a plain dict, so CallbackWriter(records.append) type-checks for a list of dicts


@runtime_checkable
class MetricWriter(Protocol):
    """What ``fit(..., writers=[...])`` accepts: ``write`` gets each chunk's record; ``flush`` is
    called when ``fit`` returns or stops (normally, on a signal or on divergence)."""

    def write(self, record: Record) -> None: ...

    def flush(self) -> None: ...


def scalars(record: Record) -> dict[str, float]:
    """The numeric entries of a record (everything but ``phase`` and ``step``), as floats.

    Example:
      >>> scalars({"phase": "maml", "step": 10, "meta_loss": 0.5, "steps_per_s": 100})
      {'meta_loss': 0.5, 'steps_per_s': 100.0}
    """
    return {k: float(v) for k, v in record.items()
            if k not in ("phase", "step") and isinstance(v, int | float) and not isinstance(v, bool)}


class JsonlWriter:
    """Appends each record as one JSON line to ``path`` (created, with its folder, if missing).

    Args:
      path: the ``.jsonl`` file.

    Example:
      >>> import tempfile, os
      >>> path = os.path.join(tempfile.mkdtemp(), "m.jsonl")
      >>> w = JsonlWriter(path)
      >>> w.write({"phase": "maml", "step": 10, "meta_loss": 0.25})
      >>> w.flush()
      >>> import pathlib
      >>> pathlib.Path(path).read_text()
      '{"phase": "maml", "step": 10, "meta_loss": 0.25}\\n'
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)

    def write(self, record: Record) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record)) + "\n")

    def flush(self) -> None:
        """Nothing to do: each record is written and closed at once."""


class CallbackWriter:
    """Calls ``fn(record)`` for each record.

    Args:
      fn: any callable taking the record dict.

    Example:
      >>> seen = []
      >>> w = CallbackWriter(seen.append)
      >>> w.write({"phase": "maml", "step": 5, "meta_loss": 1.0})
      >>> seen[0]["step"]
      5
    """

    def __init__(self, fn: Callable[[Record], Any]):
        if not callable(fn):
            raise TypeError(f"CallbackWriter: fn must be callable, got {fn!r}")
        self.fn = fn

    def write(self, record: Record) -> None:
        self.fn(record)

    def flush(self) -> None:
        """Nothing to do."""


class TensorBoardWriter:
    """Writes each record's scalars to TensorBoard event files in ``logdir``, tagged
    ``PHASE/METRIC`` (e.g. ``maml/meta_loss``) at the record's step and wall time.

    Uses ``tensorboardX`` (the optional extra ``jmaml[tensorboard]``; no TensorFlow or PyTorch
    needed). View with ``tensorboard --logdir LOGDIR``.

    Args:
      logdir: the folder for the event files (created, with the event file, at the first record).

    Raises:
      ImportError: ``tensorboardX`` is not installed (naming the extra to install).

    Example:
      >>> import tempfile
      >>> w = TensorBoardWriter(tempfile.mkdtemp())  # doctest: +SKIP
      >>> w.write({"phase": "maml", "step": 10, "meta_loss": 0.5, "wall_time": 1.8e9})  # doctest: +SKIP
      >>> w.close()  # doctest: +SKIP
    """

    def __init__(self, logdir: str | os.PathLike[str]):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError("TensorBoardWriter needs tensorboardX: pip install 'jmaml[tensorboard]' "
                              "(or pip install tensorboardX)") from None
        self.logdir = os.fspath(logdir)
        self._make = SummaryWriter
        self._writer: Any = None  # made at the first record: nothing on disk before the run starts

    def write(self, record: Record) -> None:
        if self._writer is None:
            self._writer = self._make(logdir=self.logdir)
        phase, step = record.get("phase", "run"), int(record["step"])
        wall = record.get("wall_time")
        for name, value in scalars(record).items():
            if name != "wall_time":
                self._writer.add_scalar(f"{phase}/{name}", value, global_step=step, walltime=wall)
        self._writer.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file (a later record opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def check_writers(writers: Any) -> list[MetricWriter]:
    """``writers`` as a list, each checked to have ``write`` and ``flush`` (a clear TypeError otherwise)."""
    if writers is None:
        return []
    if isinstance(writers, MetricWriter):
        writers = [writers]
    out = list(writers)
    for i, w in enumerate(out):
        if not isinstance(w, MetricWriter):
            raise TypeError(f"writers[{i}] = {w!r} is not a metric writer: it needs write(record) and flush() "
                            "methods (jmaml.writers.JsonlWriter, TensorBoardWriter, CallbackWriter)")
    return out
