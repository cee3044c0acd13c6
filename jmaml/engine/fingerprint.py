"""What decides a run's trajectory, written down: a JSON description of learners, task
distributions, optimisers and arrays, and its hash.

``jmaml.fit`` records, in every checkpoint it writes, a *fingerprint* of everything that decides
the numbers of a run: the learner (its name, default hyperparameters and the values its functions
close over -- inner rate, inner steps, options), the task distribution (its name, the values its
sampler closes over, its data's shapes and a digest of its contents), the meta-optimiser (the
values its functions close over: rates, betas, eps ...), the meta-batch size, the key, the initial
parameters (a digest), the model state's layout and the precision (``jax_enable_x64``). A resume
whose fingerprint differs is refused, naming what changed.

The description is read from the objects themselves: the factories of jmaml, optax, Equinox and
Flax close over their settings, and ``describe`` walks those closures (numbers, strings, arrays,
nested functions, NamedTuples, dataclasses). What it cannot see -- a value a function reads from
a global variable or a file, or an object's state held outside its fields -- does not enter it;
for such a run give ``fit(..., fingerprint={...})`` the settings yourself (they are recorded and
compared beside the rest).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jmaml.core.moved import FORMER

# Bounds that keep a description small and quick whatever a closure holds.
_MAX_DEPTH = 24
_MAX_NODES = 20_000
_SMALL_ARRAY = 16          # arrays up to this many elements are written out, larger ones digested
_DIGEST_ELEMENTS = 1 << 22  # larger arrays are digested on an even subsample of this many elements


def digest_array(a: Any) -> str:
    """A short hash of an array's dtype, shape and contents (an even subsample of very large ones)."""
    arr = np.asarray(jax.random.key_data(a) if _is_key(a) else a)
    flat = arr.reshape(-1)
    if flat.size > _DIGEST_ELEMENTS:
        flat = flat[:: math.ceil(flat.size / _DIGEST_ELEMENTS)]
    h = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
    h.update(np.ascontiguousarray(flat).tobytes())
    return h.hexdigest()[:16]


def digest_array_tree(tree: Any) -> str | None:
    """A short hash of a pytree of arrays: its structure and every leaf's digest (None for None)."""
    if tree is None:
        return None
    leaves, treedef = jax.tree.flatten(tree)
    return digest({"tree": str(treedef), "leaves": [digest_array(leaf) for leaf in leaves]})


def _is_key(a: Any) -> bool:
    return isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def _number(x: Any) -> Any:
    x = x.item() if isinstance(x, np.generic) else x
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    return x


def _name(obj: Any) -> str:
    # a moved module is named by its former path: a run fingerprinted before the layer folders resumes after them
    module = getattr(obj, "__module__", "?")
    module = FORMER.get(module, module)
    return f"{module}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


class _Walker:
    def __init__(self) -> None:
        self.nodes = 0
        self.active: set[int] = set()

    def __call__(self, obj: Any, depth: int = 0) -> Any:
        self.nodes += 1
        if depth > _MAX_DEPTH or self.nodes > _MAX_NODES:
            return "..."
        if obj is None or isinstance(obj, bool | int | str):
            return obj
        if isinstance(obj, float | np.generic):
            return _number(obj)
        if isinstance(obj, jax.Array | np.ndarray):
            if isinstance(obj, jax.core.Tracer):
                return {"traced": str(obj.aval)}
            arr = np.asarray(jax.random.key_data(obj)) if _is_key(obj) else np.asarray(obj)
            if arr.size <= _SMALL_ARRAY:
                return {"array": str(arr.dtype), "value": [_number(v) for v in arr.reshape(-1).tolist()],
                        "shape": list(arr.shape)}
            return {"array": str(arr.dtype), "shape": list(arr.shape), "digest": digest_array(obj)}
        if id(obj) in self.active:  # a cycle
            return "<cycle>"
        self.active.add(id(obj))
        try:
            return self._compound(obj, depth + 1)
        finally:
            self.active.discard(id(obj))

    def _compound(self, obj: Any, depth: int) -> Any:
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple (GradientTransformation, ...)
            return {"type": _name(type(obj)), **{f: self(getattr(obj, f), depth) for f in obj._fields}}
        if isinstance(obj, list | tuple):
            return [self(v, depth) for v in obj]
        if isinstance(obj, set | frozenset):
            return sorted((self(v, depth) for v in obj), key=lambda d: json.dumps(d, sort_keys=True, default=str))
        if isinstance(obj, Mapping):
            return {str(k): self(v, depth) for k, v in obj.items()}
        if isinstance(obj, functools.partial):
            return {"partial": self(obj.func, depth), "args": self(obj.args, depth),
                    "keywords": self(obj.keywords, depth)}
        if isinstance(obj, types.MethodType):
            return {"method": _name(obj.__func__), "of": self(obj.__self__, depth)}
        if isinstance(obj, types.FunctionType):
            out: dict[str, Any] = {"fn": _name(obj)}
            if obj.__closure__:
                cells = {}
                for var, cell in zip(obj.__code__.co_freevars, obj.__closure__):
                    try:
                        cells[var] = self(cell.cell_contents, depth)
                    except ValueError:  # an empty cell
                        cells[var] = "<empty>"
                out["closure"] = cells
            if obj.__defaults__:
                out["defaults"] = self(obj.__defaults__, depth)
            if obj.__kwdefaults__:
                out["kwdefaults"] = self(obj.__kwdefaults__, depth)
            return out
        if isinstance(obj, types.ModuleType):
            return {"module": obj.__name__}
        if isinstance(obj, type):
            return {"class": _name(obj)}
        wrapped = getattr(obj, "__wrapped__", None)  # jax.jit, functools.wraps
        if wrapped is not None and callable(obj):
            return {"wrapped": self(wrapped, depth)}
        if dataclasses.is_dataclass(obj):  # Equinox modules, Flax linen modules, configs
            return {"type": _name(type(obj)), **{f.name: self(getattr(obj, f.name, None), depth)
                                                 for f in dataclasses.fields(obj)}}
        if isinstance(obj, jax.sharding.Sharding | jax.Device):
            return {"type": _name(type(obj))}
        leaves = None
        try:  # any other registered pytree (Flax nnx State, ...)
            leaves, treedef = jax.tree.flatten(obj)
        except Exception:  # noqa: BLE001 - not a pytree: its type is all we can say
            pass
        if leaves is not None and not (len(leaves) == 1 and leaves[0] is obj):
            return {"type": _name(type(obj)), "tree": str(treedef), "leaves": [self(v, depth) for v in leaves]}
        return {"type": _name(type(obj))}


def describe(obj: Any) -> Any:
    """A JSON-able description of ``obj``: numbers, strings and small arrays as they are, larger
    arrays by dtype, shape and digest, functions by name and the values they close over (so a
    factory's settings show), NamedTuples, dataclasses and pytrees by their fields, any other
    object by its type alone (never its ``repr``, which may hold a memory address).

    Example:
      >>> import optax
      >>> d = describe(optax.sgd(0.5))
      >>> "0.5" in json.dumps(d)
      True
    """
    return _Walker()(obj)


def digest(description: Any) -> str:
    """The 16-hex-digit hash of a description (``describe``'s output, or any JSON-able value)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: Any, new: Any, path: str = "", limit: int = 8) -> list[str]:
    """Where two descriptions differ, as ``path: old -> new`` lines (at most ``limit``), for the
    message that refuses a resume with other settings."""
    out: list[str] = []

    def short(v: Any) -> str:
        text = json.dumps(v, sort_keys=True, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    def walk(a: Any, b: Any, where: str) -> None:
        if len(out) >= limit or a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if k not in a or k not in b:
                    out.append(f"{where}.{k}: {'absent' if k not in a else short(a[k])} -> "
                               f"{'absent' if k not in b else short(b[k])}")
                else:
                    walk(a[k], b[k], f"{where}.{k}" if where else str(k))
                if len(out) >= limit:
                    return
            return
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}[{i}]")
            return
        out.append(f"{where or '(all)'}: {short(a)} -> {short(b)}")

    walk(old, new, path)
    return out
