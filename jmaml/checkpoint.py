"""Atomic, pickle-free checkpoints of PyTrees (a whole ``TrainState``).

A checkpoint is one ``.npz`` file: each leaf of the tree as an array (typed PRNG keys as their
raw key data), plus a JSON header with a format tag, the step, the leaf count and a SHA-256 of
the leaf bytes. It is written to a temporary file in the same folder, flushed to disk and moved
into place with ``os.replace``, so a crash leaves either the old or the new checkpoint, never half
of one. Restoring needs a *template* tree of the same structure (e.g. a freshly initialised
state); every leaf's shape and dtype is checked against it. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "jmaml-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted, truncated or does not fit the template."""


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_numpy(leaf: Any) -> np.ndarray:
    return np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf)


def host_leaves(tree: Any) -> list[np.ndarray]:
    """The leaves of ``tree`` as NumPy arrays, typed PRNG keys as their raw key data (what a
    checkpoint stores; also handy for comparing states bitwise)."""
    return [_to_numpy(leaf) for leaf in jax.tree.leaves(tree)]


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def save(path: str | os.PathLike, tree: Any, *, step: int, extra: dict | None = None) -> None:
    """Atomically writes ``tree`` to ``path`` (an ``.npz`` file).

    Args:
      path: destination file; its folder must exist.
      tree: any PyTree of arrays (typed PRNG keys included).
      step: the training step, stored in the header.
      extra: JSON-able metadata stored in the header.
    """
    path = os.fspath(path)
    arrays = host_leaves(tree)
    header = {"format": FORMAT, "step": int(step), "num_leaves": len(arrays),
              "sha256": _digest(arrays), "extra": extra or {}}
    payload = {f"leaf_{i:05d}": a for i, a in enumerate(arrays)}
    payload["header"] = np.asarray(json.dumps(header))
    atomic_write(path, lambda f: np.savez(f, **payload))


def atomic_write(path: str | os.PathLike, write: Any, *, text: bool = False) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, flushes it to disk and moves it into
    place with ``os.replace``: a reader, or a crash, sees the old file or the new one, never half of one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_header(path: str | os.PathLike) -> dict:
    """Reads and validates a checkpoint's header only."""
    return _load(path)[0]


def _load(path) -> tuple[dict, list[np.ndarray]]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a jmaml checkpoint (format {header.get('format')!r})")
            arrays = [np.array(data[f"leaf_{i:05d}"]) for i in range(header["num_leaves"])]
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated "
                              f"({type(e).__name__}: {e}); nothing was overwritten") from None
    if _digest(arrays) != header.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted: its checksum does not match its "
                              "contents; nothing was overwritten")
    return header, arrays


def restore(path: str | os.PathLike, template: Any, check: Any = None) -> tuple[Any, dict]:
    """Reads a checkpoint into the structure of ``template``; ``check(header)``, if given, runs on
    the header first (to refuse a checkpoint of another run with that reason, before its shapes).

    Returns:
      ``(tree, header)``.

    Raises:
      CheckpointError: if the file is missing, corrupted or truncated, or its leaves do not
        match the template's number, shapes or dtypes.
    """
    header, arrays = _load(path)
    if check is not None:
        check(header)
    leaves, treedef = jax.tree.flatten(template)
    if len(leaves) != len(arrays):
        raise CheckpointError(f"checkpoint {path} holds {len(arrays)} arrays but the model and "
                              f"optimiser expect {len(leaves)}: it was written by a different configuration")
    restored = []
    for i, (t, a) in enumerate(zip(leaves, arrays)):
        want = _to_numpy(t)
        if want.shape != a.shape or want.dtype != a.dtype:
            raise CheckpointError(f"checkpoint {path}: array {i} has shape {a.shape} and dtype {a.dtype}, "
                                  f"expected {want.shape} and {want.dtype} (a different configuration)")
        restored.append(jax.random.wrap_key_data(a, impl=jax.random.key_impl(t)) if _is_key(t)
                        else jnp.asarray(a))
    return jax.tree.unflatten(treedef, restored), header
