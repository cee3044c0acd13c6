"""The two open protocols of jmaml besides ``Model``: task distributions and meta-learners.

Both are NamedTuples of pure functions in the style of optax's ``GradientTransformation``: a
factory takes the options and closes over them; the engine (``jmaml.fit``, ``jmaml.evaluate``,
``jmaml.sweep``) calls only these fields. The benchmarks jmaml ships (sinusoids, the seed's tasks,
Omniglot, miniImageNet; MAML and its family) are instances built by factories, and a user's own
task family or algorithm is exactly as much at home.

Task data is *any pytree*: the engine only needs every leaf of a task batch to share one leading
task axis. ``jmaml.Task(support, query)`` of ``jmaml.Batch(x, y)`` is the common case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from jmaml.core.types import Params

# The metrics every learner's ``estimate`` reports besides the loss and gradient (the engine adds
# ``meta_loss`` and ``grad_norm`` itself). The divergence check reads them; everything else a learner
# reports reaches metrics.jsonl untouched.
REQUIRED_METRICS = ("task_losses", "pre_adapt_loss")


class TaskDistribution(NamedTuple):
    """A distribution over few-shot tasks.

    Attributes:
      sample: ``sample(key, num_tasks) -> tasks``: a batch of training tasks whose leaves have a
        leading task axis of ``num_tasks`` (drawn on the device, inside the compiled loop). When
        ``data`` is set it is called ``sample(key, num_tasks, data)``, so a large array (e.g. an
        image set) is an argument of the compiled program rather than a constant baked into it.
      heldout: ``heldout(key, num_tasks) -> tasks`` for evaluation (same layout; may be larger
        support/query sets than training uses), or None if the family has no held-out protocol.
      make_metric: ``make_metric(apply) -> metric(params, batch) -> scalar``: the evaluation
        metric of one task's query set for a model's ``apply`` (MSE, accuracy, ...); None: the
        learner's own loss.
      task_shapes: the shapes of one task's leaves (no task axis), as a pytree of tuples like the
        task; used to tell a single task from a batch. None: derived by ``jax.eval_shape``.
      data: see ``sample``.
      name: a short name for messages and result files.
      metric_name: what ``make_metric`` measures (``"mse"``, ``"accuracy"``, ...).
      heldout_data: ``data`` for ``heldout`` (e.g. the test split's images), when it takes one.
      higher_is_better: whether a larger metric is better (an accuracy, a return) or a smaller one (a
        loss). None: from ``metric_name`` (``metric_higher_is_better``). Evaluation uses it: a loss can
        diverge (an exploding inner loop) and such tasks are counted; a score is never dropped.

    Example:
      >>> import jax
      >>> from jmaml import Batch, Task
      >>> def lines(key, num_tasks):  # y = a x, a different slope per task
      ...     a = jax.random.normal(key, (num_tasks, 1, 1))
      ...     x = jax.random.uniform(key, (num_tasks, 10, 1))
      ...     return Task(Batch(x[:, :5], a * x[:, :5]), Batch(x[:, 5:], a * x[:, 5:]))
      >>> dist = TaskDistribution(sample=lines, heldout=lines, name="lines")
      >>> dist.sample(jax.random.key(0), 4).support.x.shape
      (4, 5, 1)
    """

    sample: Callable[..., Any]
    heldout: Callable[..., Any] | None = None
    make_metric: Callable[[Callable[..., jax.Array]], Callable[[Params, Any], jax.Array]] | None = None
    task_shapes: Any = None
    data: Any = None
    name: str = "tasks"
    metric_name: str = "loss"
    heldout_data: Any = None
    higher_is_better: bool | None = None


# metric names that are scores (higher is better) when a distribution does not say
SCORE_NAMES = frozenset({"accuracy", "acc", "top1", "top5", "f1", "auc", "r2", "return", "reward", "score"})


def metric_higher_is_better(tasks: TaskDistribution) -> bool:
    """Whether ``tasks``' metric is a score (higher is better): its ``higher_is_better``, or when that is
    None whether its ``metric_name`` is one of ``SCORE_NAMES`` (``"accuracy"``, ``"return"`` ...)."""
    if tasks.higher_is_better is not None:
        if not isinstance(tasks.higher_is_better, bool):
            raise TypeError(f"TaskDistribution.higher_is_better must be True, False or None, got "
                            f"{tasks.higher_is_better!r}")
        return tasks.higher_is_better
    return str(tasks.metric_name).lower() in SCORE_NAMES


class MetaLearner(NamedTuple):
    """A meta-learning algorithm as pure functions.

    Attributes:
      init: ``init(params) -> meta_params``: the meta-parameters for a model's initial parameters
        (the parameters themselves for MAML; plus learned rates for Meta-SGD; plus a context for
        CAVIA ...).
      estimate: ``estimate(meta_params, tasks, meta_step, **hyper) -> (loss, grads, metrics)``:
        the meta-loss and meta-gradient over a task batch (leading task axis), and a dict of
        metrics holding at least ``REQUIRED_METRICS``. ``hyper`` are traced hyperparameters the
        learner accepts per call (``inner_lr`` for most), so sweeps can vmap whole runs over them.
      adapt: ``adapt(meta_params, support, num_steps, *, observe=None, **hyper)``: the learner's
        own test-time rule for one task. Returns the adapted model parameters; with
        ``observe(params) -> value`` it returns ``(params, values)``, the value before each step
        and after the last (shape ``(num_steps + 1, ...)``): adaptation curves in one pass.
      name: the registry name (checkpoints and results are named after it).
      label: the name people use ("Meta-SGD").
      exact_gradient: whether ``grads`` is the exact gradient of ``loss`` with respect to
        ``meta_params`` (MAML, Meta-SGD ...; not Reptile, FOMAML or iMAML's approximations):
        ``jmaml.check_meta_gradient`` tests this claim.
      hyper: the default values of the per-call hyperparameters ``estimate`` and ``adapt`` take.
      model_params: ``model_params(meta_params) -> params``: the model's parameters at the
        meta-learned initialisation (for plots and baselines).
      reduction: how ``loss`` (and the gradient, ``pre_adapt_loss``) combine the tasks: ``"mean"`` or
        ``"sum"``; a meta-batch processed in blocks (``jmaml.blocking``) combines its blocks the same way.
      returns_step: ``estimate`` returns the update itself (``θ_old − θ_new``, e.g. TRPO's or PPO's outer
        step) in place of a gradient: it must be trained with an ``ApplyStep`` optimiser
        (``apply_step()``), and ``fit`` refuses any other (Adam on such a "gradient" is silently wrong).

    Example:
      >>> from jmaml import learners, make_loss, models
      >>> learner = learners.maml(make_loss(models.mlp([1, 8, 1]).apply, "mse"), inner_lr=0.01, num_inner_steps=1)
      >>> isinstance(learner, MetaLearner), learner.name, learner.exact_gradient
      (True, 'maml', True)
    """

    init: Callable[[Params], Any]
    estimate: Callable[..., tuple[jax.Array, Any, dict[str, jax.Array]]]
    adapt: Callable[..., Any]
    name: str = "learner"
    label: str = "learner"
    exact_gradient: bool = True
    hyper: dict[str, Any] = {}
    model_params: Callable[[Any], Params] = lambda meta_params: meta_params
    reduction: str = "mean"
    returns_step: bool = False


class ApplyStep(optax.GradientTransformation):
    """The meta-optimiser of a learner whose ``estimate`` returns the step itself (``returns_step``): it
    subtracts that step, as SGD at rate 1 does, and is the only optimiser ``fit`` accepts for such a
    learner (and refuses for any other). Made by ``apply_step()``."""


def apply_step() -> ApplyStep:
    """``ApplyStep``: ``θ ← θ − step`` (SGD at rate 1, with SGD's empty state).

    >>> import jax.numpy as jnp, optax
    >>> opt = apply_step()
    >>> updates, _ = opt.update(jnp.asarray([0.5]), opt.init(jnp.zeros(1)))
    >>> optax.apply_updates(jnp.asarray([1.0]), updates).tolist()
    [0.5]
    """
    return ApplyStep(*optax.sgd(1.0))


def check_optimiser_fits(learner: MetaLearner, optimiser: Any) -> None:
    """A ValueError when a ``returns_step`` learner is given any optimiser but ``apply_step()``, or
    another learner is given ``apply_step()``."""
    if learner.returns_step and not isinstance(optimiser, ApplyStep):
        raise ValueError(f"learner {learner.name!r} returns its update itself from estimate (returns_step=True): "
                         "train it with jmaml.apply_step() (jmaml.rl.trpo_optimiser()), not "
                         f"{type(optimiser).__name__} {optimiser!r:.80}")
    if isinstance(optimiser, ApplyStep) and not learner.returns_step:
        raise ValueError(f"apply_step() (trpo_optimiser()) applies a learner's own step; learner {learner.name!r} "
                         "returns a gradient: give it a meta-optimiser such as optax.adam(1e-3)")


