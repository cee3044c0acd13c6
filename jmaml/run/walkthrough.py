r"""The seed walk-through: every number of the seed document, computed by the library.

``run_walkthrough`` computes, in float64 with jmaml's autodiff path (``inner_step``,
``adapt``, ``task_objective``, an optax SGD meta-step), the conventional SGD step on D̂,
the task weights φ_j, the per-task meta-gradients, the meta-step θ⁽¹⁾, and a table of
∂W⁽ᵏ⁾/∂θ for k = 1..k_max next to the seed's closed form (Eq. 28, from ``jmaml.analytic``).
It also diagnoses divergence: inner SGD on a support set diverges when
:math:`|1 - 2\alpha\sum x^2| > 1`, i.e. when α exceeds 2/λ with λ the support-loss Hessian.

``load_tasks_json`` reads a user's own tasks for the same walk-through.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmaml.core import analytic
from jmaml.core._checks import check_finite_float, check_num_steps, check_rate, check_task
from jmaml.core._util import enable_x64
from jmaml.core.diagnostics import hessian_max_eigenvalue, step_size_bound
from jmaml.core.inner import adapt, inner_step
from jmaml.core.losses import make_loss
from jmaml.core.meta import task_objective
from jmaml.core.models import linear
from jmaml.core.types import Batch, Task
from jmaml.tasks import seed as seed_data


def _points(obj: Any, where: str) -> np.ndarray:
    if not isinstance(obj, list):
        raise TypeError(f"{where} must be a list of numbers, got {type(obj).__name__}: {obj!r}")
    if not obj:
        raise ValueError(f"{where} must hold at least one number, got an empty list")
    if len(obj) > MAX_POINTS:
        raise ValueError(f"{where} holds {len(obj)} points; the walk-through takes at most {MAX_POINTS} per set")
    for i, v in enumerate(obj):
        if isinstance(v, list):
            raise ValueError(f"{where}[{i}] is a list: {where} must be a flat list of numbers "
                             "(nested or ragged lists are not supported)")
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{where}[{i}] must be a number, got {v!r}")
        try:
            finite = math.isfinite(float(v))
        except OverflowError:  # an integer beyond float64's range
            finite = False
        if not finite:
            shown = f"an integer of {len(str(v))} digits" if isinstance(v, int) else repr(v)
            raise ValueError(f"{where}[{i}] must be a finite float64 number, got {shown}")
    return np.asarray(obj, dtype=np.float64)


def _batch(obj: Any, where: str) -> Batch:
    if not isinstance(obj, dict):
        raise TypeError(f"{where} must be an object with keys 'x' and 'y', got {obj!r}")
    for key in ("x", "y"):
        if key not in obj:
            raise ValueError(f"{where} is missing the key {key!r} (expected {{'x': [...], 'y': [...]}})")
    extra = sorted(set(obj) - {"x", "y"})
    if extra:
        raise ValueError(f"{where} has unknown keys {extra}; expected only 'x' and 'y'")
    x, y = _points(obj["x"], f"{where}.x"), _points(obj["y"], f"{where}.y")
    if x.shape != y.shape:
        raise ValueError(f"{where}.x and {where}.y must have the same length, got {len(x)} and {len(y)}")
    return Batch(x, y)


def parse_tasks(obj: Any, source: str = "tasks JSON") -> tuple[list[Task], Batch | None]:
    """Validates a decoded tasks JSON document and returns ``(tasks, conventional_batch)``.

    The document is ``{"tasks": [{"support": {"x": [...], "y": [...]}, "query": {...}}, ...],
    "conventional": {"x": [...], "y": [...]}}``; ``conventional`` is optional.

    Raises:
      ValueError/TypeError: naming the offending key or entry.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"{source}: the top level must be an object with a 'tasks' list, "
                        f"got {type(obj).__name__}")
    if "tasks" not in obj:
        raise ValueError(f"{source}: missing the key 'tasks' (a list of "
                         "{'support': {'x', 'y'}, 'query': {'x', 'y'}} objects)")
    unknown = sorted(set(obj) - {"tasks", "conventional"})
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; a tasks document has 'tasks' and optionally "
                         "'conventional'")
    raw = obj["tasks"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{source}: 'tasks' must be a non-empty list, got {raw!r}")
    if len(raw) > MAX_TASKS:
        raise ValueError(f"{source}: {len(raw)} tasks; the walk-through takes at most {MAX_TASKS}")
    tasks = []
    for j, t in enumerate(raw):
        where = f"{source}: tasks[{j}]"
        if not isinstance(t, dict):
            raise TypeError(f"{where} must be an object with keys 'support' and 'query', got {t!r}")
        for key in ("support", "query"):
            if key not in t:
                raise ValueError(f"{where} is missing the key {key!r}")
        extra = sorted(set(t) - {"support", "query"})
        if extra:
            raise ValueError(f"{where} has unknown keys {extra}; a task has 'support' and 'query'")
        tasks.append(Task(_batch(t["support"], f"{where}.support"),
                          _batch(t["query"], f"{where}.query")))
    conventional = None
    if obj.get("conventional") is not None:
        conventional = _batch(obj["conventional"], f"{source}: conventional")
    return tasks, conventional


MAX_TASKS_JSON_BYTES = 16 * 2**20  # a tasks file is a few numbers per task; more is a mistake (or /dev/zero)
MAX_TASKS = 1000
MAX_TABLE_ROWS = 100
MAX_POINTS = 10_000


def load_tasks_json(path: str) -> tuple[list[Task], Batch | None]:
    """Reads and validates a tasks JSON file (see ``parse_tasks``): at most 16 MiB of UTF-8 JSON.

    Raises:
      ValueError: naming the file: missing, a folder, unreadable, too large, not UTF-8, not JSON,
        nested too deeply, or not a tasks document.
    """
    if os.path.isdir(path):
        raise ValueError(f"--tasks: {path} is a folder, not a JSON file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TASKS_JSON_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"--tasks: file not found: {path}") from None
    except OSError as e:
        raise ValueError(f"--tasks: cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_TASKS_JSON_BYTES:
        raise ValueError(f"--tasks: {path} is larger than {MAX_TASKS_JSON_BYTES // 2**20} MiB; a tasks file holds a "
                         "few numbers per task")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"--tasks: {path} is not UTF-8 text (a binary file?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--tasks: {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"--tasks: {path} is nested too deeply to be a tasks document") from None
    return parse_tasks(obj, source=str(path))


def run_walkthrough(*, alpha: float = seed_data.ALPHA, beta: float = seed_data.BETA,
                    theta0: float = seed_data.THETA0, k_max: int = 5,
                    tasks: list[Task] | None = None,
                    conventional: Batch | None = None) -> dict[str, Any]:
    """Computes the seed walk-through in float64 with the library; returns a JSON-able dict.

    Args:
      alpha: inner rate α; beta: meta rate β; theta0: initial θ̃⁽⁰⁾.
      k_max: rows of the ∂W⁽ᵏ⁾/∂θ table (k = 1..k_max).
      tasks: the tasks (default: the seed's D1, D2). conventional: the batch for the
        conventional SGD step (default: D̂ when ``tasks`` is None, else skipped).
    """
    check_rate(alpha, "alpha")
    check_rate(beta, "beta")
    theta0 = check_finite_float(theta0, "theta0")
    k_max = check_num_steps(k_max, "k")
    if k_max > MAX_TABLE_ROWS:
        raise ValueError(f"k must be <= {MAX_TABLE_ROWS} (the rows of the dW/dtheta table), got {k_max}")
    if tasks is None:
        tasks = seed_data.task_list()
        conventional = seed_data.conventional_batch() if conventional is None else conventional
    for j, t in enumerate(tasks):
        check_task(t, f"tasks[{j}]")

    with enable_x64():
        loss = make_loss(linear().apply, "sse")
        theta = jnp.asarray(theta0, jnp.float64)
        out: dict[str, Any] = {"alpha": alpha, "beta": beta, "theta0": theta0, "loss": "sse",
                               "dtype": "float64"}
        if conventional is not None:
            out["conventional_w1"] = float(inner_step(loss, theta, conventional, inner_lr=alpha))

        # compiled once per k and task shape, so the cost is linear in the number of tasks
        @functools.partial(jax.jit, static_argnums=1)
        def meta_grad(task, k):
            return jax.grad(lambda th: task_objective(loss, th, task, inner_lr=alpha,
                                                      num_inner_steps=k))(theta)

        @functools.partial(jax.jit, static_argnums=1)
        def dw_dtheta(support, k):
            return jax.grad(lambda th: adapt(loss, th, support, inner_lr=alpha, num_steps=k))(theta)

        out["phi"] = [float(adapt(loss, theta, t.support, inner_lr=alpha, num_steps=1))
                      for t in tasks]
        grads = [meta_grad(t, 1) for t in tasks]
        out["query_grads"] = [float(g) for g in grads]
        sgd = optax.sgd(beta)
        updates, _ = sgd.update(sum(grads), sgd.init(theta), theta)
        out["theta1"] = float(optax.apply_updates(theta, updates))

        rows = []
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported as non_finite below
            for k in range(1, k_max + 1):
                row: dict[str, Any] = {"k": k, "dW_dtheta": [], "closed_form": [], "meta_grad": [],
                       "meta_grad_closed_form": []}
                for t in tasks:
                    xs, ys = np.asarray(t.support.x), np.asarray(t.support.y)
                    xq, yq = np.asarray(t.query.x), np.asarray(t.query.y)
                    d = dw_dtheta(t.support, k)
                    row["dW_dtheta"].append(float(d))
                    row["closed_form"].append(analytic.dW_dtheta(xs, alpha, k))
                    row["meta_grad"].append(float(meta_grad(t, k)))
                    row["meta_grad_closed_form"].append(
                        analytic.task_meta_grad(theta0, xs, ys, xq, yq, alpha, k))
                row["max_abs_diff"] = max(abs(a - b) for a, b in zip(row["dW_dtheta"], row["closed_form"]))
                rows.append(row)
        out["k_table"] = rows

        # Stability: one inner step multiplies dφ/dθ by c = 1 - α·λ, with λ the support loss's
        # curvature (power iteration on Hessian-vector products); it diverges when α > 2/λ.
        stability: list[dict[str, Any]] = []
        for j, t in enumerate(tasks):
            lam = float(hessian_max_eigenvalue(loss, theta, t.support, num_iters=3))
            c = 1.0 - alpha * lam
            stability.append({"task": j + 1, "hessian": lam, "contraction": c,
                              "alpha_bound": float(step_size_bound(jnp.asarray(lam))),
                              "diverges": abs(c) > 1.0})
        out["stability"] = stability
        out["diverges"] = any(s["diverges"] for s in stability)
        # float64 overflows for huge inputs (x = 1e200 squares to inf): name what is not finite
        # rather than draw conclusions from NaN (|NaN| > 1 is False, which would read as "contracts")
        scalars = {"conventional_w1": out.get("conventional_w1", 0.0), "theta1": out["theta1"],
                   **{f"phi_{j + 1}": v for j, v in enumerate(out["phi"])},
                   **{f"dL_Q{j + 1}/dtheta": v for j, v in enumerate(out["query_grads"])},
                   **{f"lambda (task {s['task']})": s["hessian"] for s in stability}}
        out["non_finite"] = [name for name, v in scalars.items() if not math.isfinite(v)]
        for s in stability:
            if not (math.isfinite(s["hessian"]) and math.isfinite(s["contraction"])):
                s["diverges"] = None  # unknown: the curvature itself overflowed
    return out


def _num(v: float) -> str:
    return f"{v:.12g}"


def format_walkthrough(r: dict[str, Any]) -> str:
    """Renders ``run_walkthrough``'s result as the text ``jmaml seed`` prints."""
    n = len(r["phi"])
    lines = [f"jmaml seed walk-through: f(x) = theta*x, sum-of-squares loss, float64, "
             f"alpha={_num(r['alpha'])}, beta={_num(r['beta'])}, theta0={_num(r['theta0'])}", ""]
    if "conventional_w1" in r:
        lines.append(f"Conventional SGD step (Eq. 4)            w(1)  = {_num(r['conventional_w1'])}")
    for j in range(n):
        lines.append(f"Task weight, one inner step (Eq. 16-17)  phi_{j + 1} = {_num(r['phi'][j])}")
    for j in range(n):
        lines.append(f"Meta-gradient dL_Q{j + 1}/dtheta (Eq. 18-19)   = {_num(r['query_grads'][j])}")
    lines.append(f"Meta-step theta(1) = theta0 - beta*sum (Eq. 20) = {_num(r['theta1'])}")
    lines += ["", "k-step derivative dW(k)/dtheta: autodiff (lax.scan) vs closed form "
              "(1 - 2*alpha*sum x^2)^k (Eq. 28)"]
    header = "  k" + "".join(f" | {f'task {j + 1} autodiff':>18} | {f'task {j + 1} closed form':>18}"
                             for j in range(n))
    lines += [header + " | max |diff|", "-" * len(header)]
    for row in r["k_table"]:
        cells = "".join(f" | {row['dW_dtheta'][j]:>18.12g} | {row['closed_form'][j]:>18.12g}"
                        for j in range(n))
        lines.append(f"{row['k']:>3}{cells} | {row['max_abs_diff']:.1e}")
    lines += ["", "Stability of the inner loop (lambda_max of the support-loss Hessian, by power iteration "
              "on Hessian-vector products):"]
    for s in r["stability"]:
        if s["diverges"] is None:
            lines.append(f"  task {s['task']}: lambda = {_num(s['hessian'])} (NON-FINITE: no stability bound)")
            continue
        verdict = "DIVERGES" if s["diverges"] else "contracts"
        lines.append(f"  task {s['task']}: lambda = {_num(s['hessian'])}, "
                     f"1 - alpha*lambda = {_num(s['contraction'])} ({verdict}; "
                     f"stable for alpha < 2/lambda = {s['alpha_bound']:.6g})")
    if r.get("non_finite"):
        lines.append(f"\nNot finite in float64: {', '.join(r['non_finite'])}. The inputs are too large for float64 "
                     "(x^2 or the curvature overflows); no conclusion about convergence can be drawn. Rescale "
                     "the data.")
    elif r["diverges"]:
        bad = [s for s in r["stability"] if s["diverges"]]
        names = ", ".join(f"task {s['task']}" for s in bad)
        lines.append(
            f"\nThis meta-step diverges: on {names}, |1 - 2*alpha*sum x^2| > 1, so each inner step "
            "multiplies the task weight's sensitivity dphi/dtheta by more than 1 in size and the "
            f"query gradient explodes; theta jumps from {_num(r['theta0'])} to {_num(r['theta1'])}. "
            "Lower alpha below the bound above (or beta) to make it converge.")
    else:
        lines.append("\nEvery task's inner loop contracts at this alpha.")
    return "\n".join(lines)
