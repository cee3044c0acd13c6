"""Input validation shared by the library: clear errors instead of deep JAX traces.

Checks here only look at static information (shapes, Python values) or at values
that are concrete; traced values pass through unchecked so every function stays
jittable.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np

from jmaml.core.types import Batch, Task


def concrete_or_none(value):
    """Returns ``value`` as a NumPy array if it is concrete, ``None`` if it is traced."""
    try:
        return np.asarray(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


MAX_INT = 2**31 - 1  # counts and sizes become int32 on the device


def _check_int(value: Any, name: str, minimum: int, kind: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a {kind}, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > MAX_INT:
        raise ValueError(f"{name} must be <= {MAX_INT} (it becomes a 32-bit integer on the device), got {value}")
    return value


def check_nonnegative_int(value, name: str) -> int:
    """Checks a Python int >= 0 (a seed, a meta-step count); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if value > MAX_INT:
        raise ValueError(f"{name} must be <= {MAX_INT} (it becomes a 32-bit integer on the device), got {value}")
    return value


def check_seed(value, name: str = "seed") -> int:
    """Checks a random seed: a Python int >= 0."""
    return check_nonnegative_int(value, name)


def check_positive_finite(value, name: str) -> float:
    """Checks a Python number that must be finite and > 0 (e.g. iMAML's λ); returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_num_steps(value, name: str = "num_inner_steps") -> int:
    """Checks a static, non-negative integer count and returns it as ``int``."""
    return _check_int(value, name, 0, "non-negative Python int")


def check_positive_int(value, name: str) -> int:
    """Checks a static integer >= 1 and returns it as ``int``."""
    return _check_int(value, name, 1, "positive int")


def check_rate(value, name: str = "inner_lr", *, allow_zero: bool = True) -> None:
    """Checks a learning rate when it is concrete: finite and non-negative (or positive).

    A tree of rates (per-parameter rates, as in Meta-SGD) is checked leaf by leaf.
    """
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be a real number or array, got {value!r}")
    if not _is_array_like(value):  # any pytree of rates: lists, dicts, NamedTuples, Equinox modules ...
        leaves = jax.tree.leaves(value)
        if not leaves:
            raise TypeError(f"{name} must be a real number, an array or a tree of them, got {value!r}")
        for leaf in leaves:
            check_rate(leaf, name, allow_zero=allow_zero)
        return
    arr = concrete_or_none(value)
    if arr is None:  # traced: checked by the caller's divergence reporting instead
        return
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a real number or array, got {value!r}")
    if arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a real number, got a bool {value!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if np.any(arr < 0) or (not allow_zero and np.any(arr == 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def _is_array_like(value) -> bool:
    return isinstance(value, (numbers.Number, np.ndarray, np.generic, jax.Array)) or (
        hasattr(value, "shape") and hasattr(value, "dtype"))


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def check_batch(batch, name: str = "batch", *, task_axis: bool = False) -> None:
    """Checks that a Batch has x and y with the same, non-zero number of points.

    With ``task_axis=True`` the points axis is axis 1 (axis 0 being tasks).
    """
    if not isinstance(batch, Batch):
        # any other pytree of arrays is a task's data too: the loss function reads it
        leaves = jax.tree.leaves(batch)
        if not leaves or not all(_is_array_like(leaf) for leaf in leaves):
            raise TypeError(f"{name} must be a jmaml.Batch(x, y) or a pytree of arrays, got {type(batch).__name__}")
        if task_axis and any(len(_shape(leaf)) < 1 for leaf in leaves):
            raise ValueError(f"{name} must have a leading task axis on every leaf; got leaf shapes "
                             f"{[_shape(leaf) for leaf in leaves]}")
        return
    xs, ys = _shape(batch.x), _shape(batch.y)
    axis = 1 if task_axis else 0
    what = "(num_tasks, num_points, ...)" if task_axis else "(num_points, ...)"
    for part, shape in (("x", xs), ("y", ys)):
        if len(shape) <= axis:
            raise ValueError(f"{name}.{part} must have shape {what}, got shape {shape}")
    if xs[axis] != ys[axis]:
        raise ValueError(f"{name}.x and {name}.y must have the same number of points, got "
                         f"x.shape={xs} and y.shape={ys}")
    if xs[axis] == 0:
        raise ValueError(f"{name} must hold at least one point, got x.shape={xs}")


def check_task(task, name: str = "task") -> None:
    """Checks a single Task (no task axis)."""
    if not isinstance(task, Task):
        raise TypeError(f"{name} must be a jmaml.Task(support, query), got {type(task).__name__}")
    check_batch(task.support, f"{name}.support")
    check_batch(task.query, f"{name}.query")


def check_task_batch(tasks, name: str = "tasks") -> int:
    """Checks a Task with a leading task axis on every leaf; returns the number of tasks."""
    if not isinstance(tasks, Task):
        raise TypeError(f"{name} must be a jmaml.Task(support, query) with a leading task axis, "
                        f"got {type(tasks).__name__}")
    check_batch(tasks.support, f"{name}.support", task_axis=True)
    check_batch(tasks.query, f"{name}.query", task_axis=True)
    sizes = {f"{name}{jax.tree_util.keystr(path)}": _shape(leaf)[0]
             for path, leaf in jax.tree_util.tree_flatten_with_path(tasks)[0]}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name} must have a leading task axis of one size on every leaf "
                         f"(shape (num_tasks, num_points, ...)); got leading sizes {sizes}. "
                         "A single task has no task axis: use task_objective, or add one "
                         "with jax.tree.map(lambda a: a[None], task).")
    num_tasks = next(iter(sizes.values()))
    if num_tasks == 0:
        raise ValueError(f"{name} must hold at least one task, got num_tasks=0")
    return num_tasks


def check_finite_float(value, name: str) -> float:
    """Checks a Python real number is finite and returns it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_task_batch_tree(tasks, name: str = "tasks", *, num_tasks: int | None = None, task_shapes=None) -> int:
    """Checks any pytree of task data with a leading task axis: every leaf shares it (of size
    ``num_tasks``, when given), and, where ``task_shapes`` states one task's leaf shapes (a pytree
    of tuples like the data), each leaf is that shape behind the task axis. Returns the number of
    tasks. Works on shapes alone, so it runs at trace time.
    """
    flat = jax.tree_util.tree_flatten_with_path(tasks)[0]
    if not flat:
        raise TypeError(f"{name} must be a pytree of arrays with a leading task axis, got {tasks!r}")
    shapes = {jax.tree_util.keystr(path): _shape(leaf) for path, leaf in flat}
    if any(len(shape) == 0 for shape in shapes.values()):
        raise ValueError(f"{name} must have a leading task axis on every leaf; got leaf shapes {shapes}")
    leading = {path: shape[0] for path, shape in shapes.items()}
    if len(set(leading.values())) != 1:
        raise ValueError(f"{name} must have a leading task axis of one size on every leaf; got leading sizes "
                         f"{leading}. Is it a single task without a task axis?")
    n = next(iter(leading.values()))
    if num_tasks is not None and n != num_tasks:
        raise ValueError(f"{name} must have a leading task axis of {num_tasks} (the tasks asked for); got leading "
                         f"size {n} on every leaf (leaf shapes {shapes}). Is it a single task without a task axis?")
    if task_shapes is not None:
        is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
        want = jax.tree.leaves(task_shapes, is_leaf=is_shape)
        got = [shape[1:] for shape in shapes.values()]
        if len(want) != len(got) or any(tuple(w) != g for w, g in zip(want, got)):
            raise ValueError(f"{name}: one task's leaves must have shapes {want} (the distribution's task_shapes) "
                             f"behind the task axis; got {got} (leaf shapes {shapes}). A single task where a batch "
                             "is expected, or a batch where a single task is expected?")
    return n


def check_max_loss_ratio(value: Any) -> float:
    """The divergence check's ratio: a number > 0 (``math.inf`` disables the check on purpose); NaN, which
    would disable it silently (every comparison with NaN is False), is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ValueError(f"max_loss_ratio must be a number > 0 (math.inf disables the check), got {value!r}")
    return float(value)
