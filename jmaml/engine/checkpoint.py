"""Atomic, pickle-free checkpoints of PyTrees (a whole ``TrainState``).

A checkpoint is one ``.npz`` file: each leaf of the tree stored under its *key path* (e.g.
``params/0/w``, ``opt_state/0/mu/0/w``; typed PRNG keys as their raw key data), plus a JSON
``header`` with a format tag, the step, the key paths in tree order and a SHA-256 of the arrays.
Any NumPy user can open it (``numpy.load``) and see which array is which; :func:`arrays` reads it
back as a ``{key path: array}`` dict for inspection or partial loading. It is written to a
temporary file in the same folder, flushed to disk and moved into place with ``os.replace``, so a
crash leaves either the old or the new checkpoint, never half of one. Restoring needs a *template*
tree (e.g. a freshly initialised state); every array is matched to the template by key path and
its shape and dtype checked. Nothing is unpickled.

Format ``jmaml-checkpoint-v1`` (leaves stored by position as ``leaf_00000``...) still loads.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import zipfile
from collections.abc import Callable
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "jmaml-checkpoint-v2"
_V1 = "jmaml-checkpoint-v1"
_HEADER = "header"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted, truncated or does not fit the template."""


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_numpy(leaf: Any) -> np.ndarray:
    return np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf)


def host_leaves(tree: Any) -> list[np.ndarray]:
    """The leaves of ``tree`` as NumPy arrays, typed PRNG keys as their raw key data.

    This is what a checkpoint stores; also handy for comparing two states bitwise.

    Args:
      tree: any PyTree of arrays.

    Returns:
      The leaves in ``jax.tree.leaves`` order, as ``numpy.ndarray``.

    Example:
      >>> import jax.numpy as jnp
      >>> [a.tolist() for a in host_leaves({"b": jnp.ones(2), "a": jnp.zeros(1)})]
      [[0.0], [1.0, 1.0]]
    """
    return [_to_numpy(leaf) for leaf in jax.tree.leaves(tree)]


def key_paths(tree: Any) -> list[str]:
    """Each leaf's key path as a ``/``-joined string, in ``jax.tree.leaves`` order.

    Dict keys, sequence indices and attribute names (NamedTuple fields, dataclass fields) each
    become one component; the root leaf of a bare array is ``"."``.

    Args:
      tree: any PyTree.

    Returns:
      One string per leaf.

    Raises:
      CheckpointError: two leaves would share a name (a dict key containing ``/``, say).

    Example:
      >>> import jax.numpy as jnp
      >>> key_paths({"params": [{"w": jnp.ones(2), "b": jnp.zeros(1)}], "step": jnp.asarray(3)})
      ['params/0/b', 'params/0/w', 'step']
    """
    names = [jax.tree_util.keystr(path, simple=True, separator="/") or "."
             for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if len(set(names)) != len(names) or _HEADER in names:
        clash = sorted({n for n in names if names.count(n) > 1 or n == _HEADER})
        raise CheckpointError(f"cannot name the tree's leaves uniquely by key path: {clash} "
                              f"(a key containing '/' or named {_HEADER!r}?)")
    return names


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def save(path: str | os.PathLike[str], tree: Any, *, step: int, extra: dict[str, Any] | None = None) -> None:
    """Atomically writes ``tree`` to ``path`` (an ``.npz`` file), each array under its key path.

    Args:
      path: destination file; its folder must exist.
      tree: any PyTree of arrays (typed PRNG keys included).
      step: the training step, stored in the header.
      extra: JSON-able metadata stored in the header.

    Raises:
      CheckpointError: the leaves cannot be named uniquely by key path.

    Example:
      >>> import jax.numpy as jnp, tempfile, os
      >>> path = os.path.join(tempfile.mkdtemp(), "c.npz")
      >>> save(path, {"w": jnp.ones((2, 3))}, step=5)
      >>> {k: a.shape for k, a in arrays(path).items()}
      {'w': (2, 3)}
    """
    path = os.fspath(path)
    # what its own reader refuses is refused here, by name, before anything is written
    try:
        index = None if isinstance(step, bool) else operator.index(step)  # ints, NumPy and JAX integer scalars
    except TypeError:
        index = None
    if index is None or index < 0:
        raise ValueError(f"step must be a non-negative integer (the training step), got {step!r}")
    step = index
    names = key_paths(tree)
    leaves = host_leaves(tree)
    for name, leaf in zip(names, leaves):
        if leaf.dtype.kind not in "biufc":
            raise TypeError(f"checkpoint leaf {name!r} has dtype {leaf.dtype} ({type(leaf).__name__}); a checkpoint "
                            "holds numeric arrays only (bool, int, float, complex), not objects or strings")
    header = {"format": FORMAT, "step": int(step), "num_leaves": len(leaves), "keys": names,
              "sha256": _digest(leaves), "extra": extra or {}}
    payload = dict(zip(names, leaves))
    payload[_HEADER] = np.asarray(json.dumps(header))
    atomic_write(path, lambda f: np.savez(f, **payload))  # type: ignore[arg-type]


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], object], *, text: bool = False) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, flushes it to disk and moves it
    into place with ``os.replace``: a reader, or a crash, sees the old file or the new one, never
    half of one.

    Args:
      path: the destination file; its folder must exist.
      write: called once with the open temporary file.
      text: open the file in text mode (UTF-8) instead of binary.

    Example:
      >>> import tempfile, os
      >>> path = os.path.join(tempfile.mkdtemp(), "note.txt")
      >>> atomic_write(path, lambda f: f.write("done"), text=True)
      >>> import pathlib
      >>> pathlib.Path(path).read_text()
      'done'
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w" if text else "wb", encoding="utf-8" if text else None) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and validates a checkpoint, returning its header (format, step, keys, extra).

    Raises:
      CheckpointError: the file is missing, corrupted or truncated.
    """
    return _load(path)[0]


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A checkpoint's header and its arrays by key path, read and checksummed once.

    Raises:
      CheckpointError: the file is missing, corrupted or truncated.
    """
    header, leaves = _load(path)
    return header, dict(zip(_names(header), leaves))


def arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every array a checkpoint holds, by key path, in tree order (checked against its checksum).

    Use it to inspect a checkpoint or to load part of one (e.g. only ``params/...``). A
    version-1 checkpoint has no key paths: its arrays are named ``leaf_00000``, ``leaf_00001``...
    ``read`` returns the header too.

    Raises:
      CheckpointError: the file is missing, corrupted or truncated.

    Args:
      path: the checkpoint file.

    Returns:
      ``{key path: numpy array}``.

    Example:
      >>> import jax.numpy as jnp, tempfile, os
      >>> path = os.path.join(tempfile.mkdtemp(), "c.npz")
      >>> save(path, {"params": [{"w": jnp.ones((2, 2))}], "step": jnp.asarray(3)}, step=3)
      >>> {k: v.shape for k, v in arrays(path).items()}
      {'params/0/w': (2, 2), 'step': ()}
    """
    return read(path)[1]


def _names(header: dict[str, Any]) -> list[str]:
    if header["format"] == _V1:
        return [f"leaf_{i:05d}" for i in range(header["num_leaves"])]
    return list(header["keys"])


def _check_header(path: str, header: Any, num_arrays: int) -> None:
    """A header's fields have the types and ranges jmaml writes: refused by name, never an AttributeError
    deep inside or a loop over a forged count."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a jmaml checkpoint (its header is a JSON {type(header).__name__}, "
                              "not an object)")
    if header.get("format") not in (FORMAT, _V1):
        raise CheckpointError(f"{path} is not a jmaml checkpoint (format {header.get('format')!r})")
    step = header.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {path} is corrupted: its header's step is {step!r}, not a count >= 0")
    if "extra" in header and not isinstance(header["extra"], dict):
        raise CheckpointError(f"checkpoint {path} is corrupted: its header's extra is a "
                              f"{type(header['extra']).__name__}, not an object")
    if header["format"] == _V1:
        count = header.get("num_leaves")
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= num_arrays:
            raise CheckpointError(f"checkpoint {path} is corrupted: its header names {count!r} arrays and the file "
                                  f"holds {num_arrays}")
    else:
        keys = header.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(keys) > num_arrays:
            raise CheckpointError(f"checkpoint {path} is corrupted: its header's keys are not a list of at most "
                                  f"{num_arrays} names")


def check_step(path: str | os.PathLike[str], header: dict[str, Any], tree: Any) -> None:
    """Refuses a checkpoint whose header's step is not the step its state holds (``tree.step`` or
    ``tree["step"]``, where the tree has one): a forged or mismatched header would make a resume trim
    the wrong metrics or skip a phase."""
    inner = getattr(tree, "step", None) if not isinstance(tree, dict) else tree.get("step")
    if inner is None or isinstance(inner, (dict, list, tuple)) or np.ndim(inner) != 0:
        return
    if int(np.asarray(inner)) != header["step"]:
        raise CheckpointError(f"checkpoint {os.fspath(path)} is corrupted: its header says step {header['step']} "
                              f"and its state holds step {int(np.asarray(inner))}; nothing was overwritten")


def _load(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[np.ndarray]]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            header = json.loads(str(data[_HEADER]))
            _check_header(path, header, len(data.files) - 1)
            leaves = [np.array(data[name]) for name in _names(header)]
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated "
                              f"({type(e).__name__}: {e}); nothing was overwritten") from None
    if _digest(leaves) != header.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted: its checksum does not match its "
                              "contents; nothing was overwritten")
    return header, leaves


def restore(path: str | os.PathLike[str], template: Any,
            check: Callable[[dict[str, Any]], object] | None = None) -> tuple[Any, dict[str, Any]]:
    """Reads a checkpoint into the structure of ``template``.

    Arrays are matched to the template's leaves by key path (by position for a version-1 file),
    and each one's shape and dtype is checked.

    Args:
      path: the checkpoint file.
      template: a tree of the structure to restore (e.g. a freshly initialised ``TrainState``).
      check: called with the header first, to refuse a checkpoint of another run with that
        reason before its shapes are compared.

    Returns:
      ``(tree, header)``.

    Raises:
      CheckpointError: if the file is missing, corrupted or truncated, or its arrays do not
        match the template's key paths, number, shapes or dtypes.

    Example:
      >>> import jax.numpy as jnp, tempfile, os
      >>> path = os.path.join(tempfile.mkdtemp(), "c.npz")
      >>> save(path, {"w": jnp.arange(3.0)}, step=2)
      >>> tree, header = restore(path, {"w": jnp.zeros(3)})
      >>> tree["w"].tolist(), header["step"]
      ([0.0, 1.0, 2.0], 2)
    """
    header, stored = _load(path)
    if check is not None:
        check(header)
    leaves, treedef = jax.tree.flatten(template)
    if len(leaves) != len(stored):
        raise CheckpointError(f"checkpoint {path} holds {len(stored)} arrays but the model and "
                              f"optimiser expect {len(leaves)}: it was written by a different configuration")
    if header["format"] == _V1:
        names, ordered = _names(header), stored
    else:
        names = key_paths(template)
        by_name = dict(zip(header["keys"], stored))
        missing = [n for n in names if n not in by_name]
        if missing:
            raise CheckpointError(f"checkpoint {path} has no array {missing[0]!r} (it holds "
                                  f"{', '.join(header['keys'][:6])}...): a different configuration")
        ordered = [by_name[n] for n in names]
    restored = []
    for name, t, a in zip(names, leaves, ordered):
        want = _to_numpy(t)
        if want.shape != a.shape or want.dtype != a.dtype:
            raise CheckpointError(f"checkpoint {path}: array {name!r} has shape {a.shape} and dtype {a.dtype}, "
                                  f"expected {want.shape} and {want.dtype} (a different configuration)")
        restored.append(jax.random.wrap_key_data(jnp.asarray(a), impl=jax.random.key_impl(t)) if _is_key(t)
                        else jnp.asarray(a))
    tree = jax.tree.unflatten(treedef, restored)
    check_step(path, header, tree)
    return tree, header


def _nest(flat: dict[str, Any]) -> Any:
    """Nested dicts from ``/``-joined key paths; a level whose keys are exactly 0..n-1 becomes a list."""
    if list(flat) == [""]:
        return flat[""]
    groups: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        head, _, rest = name.partition("/")
        groups.setdefault(head, {})[rest] = value
    nested = {k: _nest(v) for k, v in groups.items()}
    if all(k.isdigit() for k in nested) and sorted(int(k) for k in nested) == list(range(len(nested))):
        return [nested[str(i)] for i in range(len(nested))]
    return nested


def restore_params(path: str | os.PathLike[str], like: Any = None, *, prefix: str = "params") -> Any:
    """The parameters alone from a checkpoint, without building a whole ``TrainState`` template.

    Args:
      path: a checkpoint written by ``jmaml.fit`` (or ``save``).
      like: None: the parameters as nested dicts and lists (a list where a level's keys are 0..n-1),
        rebuilt from the stored key paths; or a tree of the parameters' structure (e.g.
        ``model.init(key)`` or ``learner.init(...)``): the arrays restored into it, each one's shape
        and dtype checked.
      prefix: the key path of the parameters in the saved tree (``"params"`` in a ``TrainState``;
        ``"points/params"`` in a population's, with a leading population axis).

    Returns:
      The parameters (``jax.Array`` leaves).

    Raises:
      CheckpointError: the file is unreadable, holds nothing under ``prefix``, is a version-1 file
        (arrays by position, no key paths: use ``jmaml.train.load_params(run_dir)`` for a CLI run), or
        does not match ``like``.

    Example:
      >>> import jax.numpy as jnp, tempfile, os
      >>> path = os.path.join(tempfile.mkdtemp(), "c.npz")
      >>> save(path, {"params": [{"w": jnp.ones((2, 2))}], "step": jnp.asarray(3)}, step=3)
      >>> params = restore_params(path)
      >>> type(params).__name__, params[0]["w"].shape
      ('list', (2, 2))
    """
    header, stored = read(path)
    if header["format"] == _V1:
        raise CheckpointError(f"checkpoint {os.fspath(path)} is a version-1 file (arrays by position, no key paths): "
                              "restore it with a template (checkpoint.restore), or jmaml.train.load_params(run_dir) "
                              "for a run of jmaml train")
    head = prefix.strip("/") + "/"
    flat = {name[len(head):]: jnp.asarray(a) for name, a in stored.items() if name.startswith(head)}
    if prefix.strip("/") in stored:  # the parameters are one array
        flat = {"": jnp.asarray(stored[prefix.strip("/")])}
    if not flat:
        raise CheckpointError(f"checkpoint {os.fspath(path)} holds no arrays under {prefix!r} (it holds "
                              f"{', '.join(list(stored)[:6])}...)")
    if like is None:
        return _nest(flat)
    names = key_paths(like)
    leaves, treedef = jax.tree.flatten(like)
    names = ["" if n == "." else n for n in names]
    missing = [n for n in names if n not in flat]
    if missing or len(names) != len(flat):
        extra = sorted(set(flat) - set(names))
        raise CheckpointError(f"checkpoint {os.fspath(path)}: the parameters under {prefix!r} do not match `like` "
                              f"(missing {missing[:4]}, unexpected {extra[:4]})")
    out = []
    for name, t in zip(names, leaves):
        a = flat[name]
        if jnp.shape(t) != a.shape or jnp.asarray(t).dtype != a.dtype:
            raise CheckpointError(f"checkpoint {os.fspath(path)}: {prefix}/{name} has shape {a.shape} and dtype "
                                  f"{a.dtype}, `like` has {jnp.shape(t)} and {jnp.asarray(t).dtype}")
        out.append(a)
    return jax.tree.unflatten(treedef, out)

