r"""The MAML paper's sinusoid protocol and a run folder's evaluation (``eval.json``, ``eval.md``); the
library's evaluation of any learner on any task family is ``jmaml.evaluation`` (its names are
importable from here too).

A fixed set of 600 held-out sinusoid tasks (from a fixed seed, the same on every call) is
adapted with K ∈ {5, 10, 20} support points — the same K points at every step — and scored by
the MSE on 100 query points after 0..10 inner gradient steps; reported as the mean over tasks and
a 95% confidence interval (1.96 standard errors). The K-point support sets are nested (the first
5 of the 10, the first 10 of the 20), so shots are compared on the same tasks.

The "pretrained" baseline (one network trained by regression on tasks from the whole
distribution) is fine-tuned with SGD at a step size chosen on separate validation tasks, as in
the paper.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmaml import tasks
from jmaml.core._checks import check_positive_int
from jmaml.core._util import default_float
from jmaml.core.losses import make_loss
from jmaml.core.protocols import MetaLearner
from jmaml.core.types import Batch, LossFn, Params
from jmaml.engine.evaluation import (  # the library's evaluation, importable from here as before (explicit re-exports)
    BASELINE as BASELINE,
)
from jmaml.engine.evaluation import (
    DIVERGED_RATIO as DIVERGED_RATIO,
)
from jmaml.engine.evaluation import (
    EVAL_SEED as EVAL_SEED,
)
from jmaml.engine.evaluation import (
    FINETUNE_LRS as FINETUNE_LRS,
)
from jmaml.engine.evaluation import (
    MAX_EVAL_STEPS as MAX_EVAL_STEPS,
)
from jmaml.engine.evaluation import (
    MAX_EVAL_TASKS as MAX_EVAL_TASKS,
)
from jmaml.engine.evaluation import (
    NUM_EVAL_TASKS as NUM_EVAL_TASKS,
)
from jmaml.engine.evaluation import (
    VALIDATION_SEED as VALIDATION_SEED,
)
from jmaml.engine.evaluation import (
    _take_shots as _take_shots,
)
from jmaml.engine.evaluation import (
    adaptation_curve as adaptation_curve,
)
from jmaml.engine.evaluation import (
    evaluate as evaluate,
)
from jmaml.engine.evaluation import (
    evaluate_population as evaluate_population,
)
from jmaml.engine.evaluation import (
    learner_curves as learner_curves,
)
from jmaml.engine.evaluation import (
    pretrained_baseline as pretrained_baseline,
)
from jmaml.engine.evaluation import (
    summarize as summarize,
)
from jmaml.run import recipes, rundir
from jmaml.tasks import sinusoid

SHOTS = sinusoid.SHOTS
NUM_EVAL_QUERY = sinusoid.NUM_EVAL_QUERY


class HeldOut(NamedTuple):
    """Fixed evaluation tasks: their parameters, max(shots) support points and a query set."""

    params: sinusoid.SinusoidParams
    support: Batch  # (num_tasks, max_shots, 1)
    query: Batch  # (num_tasks, num_query, 1)


def heldout_tasks(*, seed: int = EVAL_SEED, num_tasks: int = NUM_EVAL_TASKS,
                  max_shots: int = max(SHOTS), num_query: int = NUM_EVAL_QUERY) -> HeldOut:
    """The fixed held-out tasks: the same seed gives the same tasks on every call."""
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    key_p, key_s, key_q = jax.random.split(jax.random.key(seed), 3)
    params = sinusoid.sample_params(key_p, num_tasks)
    return HeldOut(params, sinusoid.sample_points(key_s, params, max_shots),
                   sinusoid.sample_points(key_q, params, num_query))


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_steps", "prox_lambda"))
def _curves(loss_fn: LossFn, params: Params, support: Batch, query: Batch, step_rates: Any,
            num_steps: int, prox_lambda: float = 0.0) -> jax.Array:
    """Adaptation curves for several rate schedules at once: ``step_rates`` has a leading axis of
    schedules, then one of steps; returns shape ``(num_schedules, num_tasks, num_steps + 1)``.

    Jitted with the loss function static and the parameters as an argument, so the MAML model,
    the baseline and the validation search share one compiled program per shape.
    """
    return jax.vmap(lambda rates: adaptation_curve(loss_fn, params, support, query, inner_lr=rates,
                                                   num_steps=num_steps, per_step=True,
                                                   prox_lambda=prox_lambda))(step_rates)


def _scalar_schedules(rates: Sequence[float], num_steps: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(rates, default_float())[:, None], (len(rates), num_steps))


def choose_finetune_lr(loss_fn: LossFn, params: Params, *, shots: int,
                       candidates: Sequence[float] = FINETUNE_LRS, num_tasks: int = NUM_EVAL_TASKS,
                       num_steps: int = MAX_EVAL_STEPS) -> tuple[float, dict[str, float]]:
    """Picks the SGD fine-tuning rate with the lowest mean query MSE over steps 1..num_steps,
    on validation tasks drawn from a seed separate from the test tasks.

    Returns:
      ``(best_rate, {rate: score})``; diverging rates score ``inf``.
    """
    val = heldout_tasks(seed=VALIDATION_SEED, num_tasks=num_tasks, max_shots=shots)
    curves = np.asarray(_curves(loss_fn, params, val.support, val.query,
                                _scalar_schedules(candidates, num_steps), num_steps))
    scores = {}
    for lr, c in zip(candidates, curves):
        score = c[:, 1:].mean()
        scores[str(lr)] = float(score) if np.isfinite(score) else float("inf")
    best = min(candidates, key=lambda lr: scores[str(lr)])
    return float(best), scores


def evaluate_params(loss_fn: LossFn, params: Params, *, inner_lrs: dict[int, float] | None = None,
                    step_rates: Any = None, prox_lambda: float = 0.0, shots: Sequence[int] = SHOTS,
                    num_tasks: int = NUM_EVAL_TASKS, num_steps: int = MAX_EVAL_STEPS) -> dict[str, Any]:
    """Adaptation curves (mean, 95% CI) on the held-out tasks for each K in ``shots``.

    Either ``inner_lrs`` (one SGD rate per K) or ``step_rates`` (a per-step rate tree with leading
    axis ``num_steps``, the same for every K: learned rates, see ``jmaml.learners``); the latter
    is recorded as ``"inner_lr": "learned"`` unless it is one constant.
    """
    if (inner_lrs is None) == (step_rates is None):
        raise ValueError("pass exactly one of inner_lrs (a rate per K) and step_rates (a per-step schedule)")
    tasks = heldout_tasks(num_tasks=num_tasks, max_shots=max(shots))
    out = {}
    label: Any
    for k in shots:
        if inner_lrs is not None:
            rates, label = _scalar_schedules([inner_lrs[k]], num_steps), inner_lrs[k]
        else:
            rates, label = jax.tree.map(lambda r: r[None], step_rates), _rate_label(step_rates)
        losses = np.asarray(_curves(loss_fn, params, _take_shots(tasks.support, k), tasks.query, rates,
                                    num_steps, prox_lambda))[0]
        out[str(k)] = {"inner_lr": label, **summarize(losses)}
    return out


def _rate_label(step_rates: Any) -> float | str:
    """A rate schedule as eval.json records it: its one value, or "learned"."""
    values = np.unique(np.concatenate([np.ravel(r) for r in jax.tree.leaves(step_rates)]))
    # one constant: its shortest decimal form in the rates' precision (0.01, not 0.0099999998)
    return float(str(values[0])) if values.size == 1 else "learned"


def _learner_rate_label(config, learner: MetaLearner) -> float | str:
    """What eval.json records as a learner's inner rate: α for a fixed rate, else "learned"."""
    return _rate_label(jnp.asarray(config.inner_lr, jnp.float32)) if "inner_lr" in learner.hyper else "learned"


def evaluate_run(run_dir: str, *, num_tasks: int = NUM_EVAL_TASKS, write: bool = True) -> dict[str, Any]:
    """Evaluates a finished run's meta-learned model by its task family's protocol (and the
    pretrained baseline, where there is one); writes eval.json / eval.md.

    Results are keyed by the algorithm's name (``results[results["algo"]]``)."""
    config = rundir.load_config(run_dir)
    family = tasks.family(config.task)
    protocol = family.protocol(config)
    model, train_loss = recipes.build_model(config)
    learner = recipes.build_learner(config, train_loss)
    dist = recipes.build_tasks(config)
    meta, scored = _load_meta_params(run_dir, config)
    describe = {k: (num_tasks if v is None else v) for k, v in protocol.describe.items()}
    results: dict[str, Any] = {"protocol": describe, "algo": config.algo, "checkpoint": scored}
    summary = evaluate(learner, meta, dist, apply=model.apply, num_tasks=num_tasks, num_steps=protocol.num_steps,
                       shots=protocol.shots, key=EVAL_SEED, batch_size=protocol.batch_size,
                       diverged_ratio=protocol.diverged_ratio, label=protocol.label)
    rate = _learner_rate_label(config, learner)
    results[config.algo] = {k: {"inner_lr": rate, **v} for k, v in summary.items()}
    baseline = rundir.checkpoint_path(run_dir, BASELINE)
    if BASELINE in config.phases() and os.path.exists(baseline):
        base_model, _ = recipes.build_model(config, BASELINE)
        eval_loss = make_loss(base_model.apply, "mse")  # the paper reports MSE, whatever the training loss
        state, _ = rundir.restore_phase(run_dir, config, BASELINE, recipes.initial_state(config, BASELINE))
        lrs, scores = {}, {}
        for k in SHOTS:
            lrs[k], scores[str(k)] = choose_finetune_lr(eval_loss, state.params, shots=k, num_steps=protocol.num_steps)
        results[BASELINE] = evaluate_params(eval_loss, state.params, inner_lrs=lrs, num_tasks=num_tasks,
                                            num_steps=protocol.num_steps)
        results["pretrained_lr_search"] = scores
    if write:
        _write_results(run_dir, results)
    return results


def _load_meta_params(run_dir: str, config) -> tuple[Any, dict[str, Any]]:
    """The meta-learned parameters, and what eval.json records of the checkpoint scored: its step, whether
    the run had finished, and whether the checkpoint's run fingerprint proves it is this run's. An
    unfinished run (still training, or stopped) or an unverifiable checkpoint is scored, and said so
    on stderr and in the record."""
    state, header = rundir.restore_phase(run_dir, config, config.algo, recipes.initial_state(config))
    extra = header.get("extra", {})
    scored = {"step": int(header["step"]), "of_steps": int(config.steps),
              "finished": int(header["step"]) >= int(config.steps), "verified": "run" in extra}
    if not scored["finished"]:
        print(f"jmaml eval: {run_dir} is at step {scored['step']} of {config.steps} (still training, or stopped): "
              "scoring that checkpoint; eval.json records its step", file=sys.stderr)
    if not scored["verified"]:
        print(f"jmaml eval: {rundir.checkpoint_path(run_dir, config.algo)} records no run fingerprint (written by "
              "jmaml before fingerprints, or edited): it cannot be checked to be this run's own; eval.json says "
              "so (checkpoint.verified: false)", file=sys.stderr)
    return state.params, scored


def learner_results(results: dict[str, Any]) -> dict[str, Any]:
    """The meta-learner's entry of an eval.json: ``results[algo]``, or ``results["maml"]`` in files
    written before results were named after the algorithm."""
    algo = results.get("algo", "maml")
    return results[algo] if algo in results else results["maml"]


def _write_results(run_dir: str, results: dict[str, Any]) -> None:
    rundir.atomic_write_text(os.path.join(run_dir, "eval.json"), json.dumps(results, indent=2))
    scored = results.get("checkpoint") or {}
    notes = ([f"Scored the checkpoint at step {scored['step']} of {scored['of_steps']}: the run had not finished."]
             if scored and not scored.get("finished", True) else []) + \
            (["The checkpoint records no run fingerprint: it could not be checked to be this run's own."]
             if scored and not scored.get("verified", True) else [])
    rundir.atomic_write_text(os.path.join(run_dir, "eval.md"),
                             format_table(results) + "\n" + "".join(f"\n{n}\n" for n in notes))


def _rate(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _cell(r: dict[str, Any], s: int) -> str:
    text = f"{r['mean'][s]:.3f} ± {r['ci95'][s]:.3f}"
    diverged = r.get("diverged", [0] * len(r["mean"]))[s]
    if not diverged:
        return text
    every = r.get("mean_all")
    return text + f" ({diverged}/{r['num_tasks']} diverged" + (f"; all tasks {every[s]:.3g})" if every else ")")


def format_table(results: dict[str, Any], steps: Sequence[int] = (0, 1, 5, 10)) -> str:
    """A Markdown table: query MSE (accuracy, for image tasks) ± 95% CI after the given numbers of
    steps (those evaluated, and always the last), per model and K.

    A cell names the number of tasks whose loss diverged (left out of its mean), if any, and the
    mean over all tasks. The
    meta-learned model is named by its algorithm.
    """
    available = len(next(iter(learner_results(results).values()))["mean"])
    steps = [s for s in steps if s < available]
    if available - 1 not in steps:  # always show the last step evaluated
        steps.append(available - 1)
    head = "| model | K | inner lr | " + " | ".join(f"{s} step{'s' if s != 1 else ''}" for s in steps) + " |"
    lines = [head, "|" + " --- |" * (3 + len(steps))]
    for name, rows in (("", learner_results(results)), (BASELINE, results.get(BASELINE))):
        if rows is None:
            continue
        for k, r in rows.items():
            cells = " | ".join(_cell(r, s) for s in steps)
            lines.append(f"| {name or results.get('algo', 'maml')} | {k} | {_rate(r['inner_lr'])} | {cells} |")
    return "\n".join(lines)
