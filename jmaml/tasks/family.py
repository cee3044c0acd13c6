"""What a task family offers the configuration layer (``TrainConfig``, the CLI): how to build its
``TaskDistribution`` and default model from a config, its own checks, evaluation protocol and
presets. The engine never sees a family; ``jmaml.tasks.FAMILIES`` names them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from jmaml.core.protocols import TaskDistribution
from jmaml.core.types import Model


class EvalProtocol(NamedTuple):
    """How a family's runs are evaluated (``jmaml.evaluate``).

    Attributes:
      shots: support sizes to evaluate, each on the first K support points of the same held-out tasks
        (None: the tasks as sampled, reported under ``label``).
      num_steps: test-time steps (curves run 0..num_steps).
      batch_size: held-out tasks per compiled evaluation call (None: all at once).
      label: the results' key when ``shots`` is None.
      diverged_ratio: a task whose metric exceeds this many times its un-adapted value has diverged
        (inf for accuracies).
      describe: extra fields for the results' ``protocol`` record.
    """

    shots: tuple[int, ...] | None
    num_steps: int
    batch_size: int | None = None
    label: str = "all"
    diverged_ratio: float = 1000.0
    describe: dict[str, Any] = {}


class TaskFamily(NamedTuple):
    """A registry entry for a task family.

    Attributes:
      distribution: ``distribution(config) -> TaskDistribution`` (training and held-out tasks).
      model: ``model(config, extra_inputs) -> Model``: the family's default model (with
        ``extra_inputs`` more input features, for learners such as CAVIA; ValueError if impossible).
      loss: ``loss(config) -> str``: the ``jmaml.make_loss`` kind it trains with.
      validate: ``validate(config)``: the family's own checks (ValueError naming the field).
      protocol: ``protocol(config) -> EvalProtocol``.
      baseline: whether the "pretrained" regression baseline applies (``config.pretrain``).
      preset: ``preset(ways, shots) -> dict`` of TrainConfig fields (the paper's settings), or None.
      host_loop_on_cpu: train with a Python loop over the jitted step on CPU (see ``jmaml.engine``).
      examples: ``examples(num_tasks, shots) -> (support, grid_x, truth_y)`` for the fits figure,
        or None when the family has no ground-truth function to draw.
      fingerprint: ``fingerprint(config) -> str``: a hash of the data a run trains on (datasets read from
        disk), recorded in checkpoints so that resuming on changed data is refused; None for generated tasks.
    """

    distribution: Callable[[Any], TaskDistribution]
    model: Callable[[Any, int], Model]
    loss: Callable[[Any], str]
    validate: Callable[[Any], None]
    protocol: Callable[[Any], EvalProtocol]
    baseline: bool = False
    preset: Callable[..., dict[str, Any]] | None = None
    host_loop_on_cpu: bool = False
    examples: Callable[..., Any] | None = None
    fingerprint: Callable[[Any], str] | None = None
