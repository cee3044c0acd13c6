"""What the engine keeps in a run dir, and the guarantees it gives about it.

``jmaml.fit(..., run=RunDir(D, ...))`` owns ``D`` while it runs, the same from Python and from the CLI:

* it holds an exclusive lock (``.jmaml.lock``, ``fcntl.flock``): a second writer -- another
  process, or a second ``fit`` -- fails at once, naming the holder's pid;
* a run's files are ``NAME.ckpt.npz`` (the whole state, with the run's fingerprint in its
  header) and its lines of ``metrics.jsonl``; nothing else in the folder is touched, and a file of
  those names that is not a jmaml run's is refused, never replaced;
* a folder holding run ``NAME`` is refused unless the caller says what to do with it:
  ``resume=True`` continues it (finished: returned as it is), ``overwrite=True`` replaces *its*
  checkpoint and metrics lines (recorded in the new checkpoint's history);
* a resume whose fingerprint (``jmaml.fingerprint``) differs from the checkpoint's is refused,
  naming what changed, unless ``allow_changed`` says so (recorded in the checkpoint's history).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from jmaml.engine import checkpoint
from jmaml.engine.fingerprint import differences

LOCK_FILE = ".jmaml.lock"
METRICS_FILE = "metrics.jsonl"

# The file that records each kind of run in its folder (the run layer's recipes and sweeps) -> the kind
RUN_RECORDS = {"config.json": "supervised", "rl_config.json": "rl", "sweep-args.json": "sweep",
               "sweep-plan.json": "sweep", "sweep.json": "sweep"}
_KIND_COMMANDS = {"supervised": "jmaml train", "rl": "jmaml rl", "sweep": "jmaml sweep"}

_held: dict[str, tuple[int, bool, int]] = {}  # folder -> (thread, shared, depth)
_held_guard = threading.Lock()


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and ``os.replace``: a reader (or a crash)
    sees the old file or the new one, never half of one (``checkpoint.atomic_write``)."""
    checkpoint.atomic_write(path, lambda f: f.write(text), text=True)


@contextlib.contextmanager
def lock(run_dir: str, *, share: bool = False) -> Iterator[None]:
    """Holds an exclusive lock on a run dir (``fcntl.flock`` on its ``.jmaml.lock``, which records the
    holder's pid) while a run writes it; a second writer -- another process, another thread, or a
    second ``lock`` in the same thread -- fails at once, naming the holder.

    ``share=True`` lends the lock to nested ``lock`` calls of the same thread: ``jmaml train``
    holds it over all its phases, and the ``fit`` of each phase takes it again inside.
    """
    os.makedirs(run_dir, exist_ok=True)
    real = os.path.realpath(run_dir)
    me = threading.get_ident()
    with _held_guard:
        held = _held.get(real)
        if held is not None:
            if held[0] != me or not held[1]:
                raise ValueError(f"run dir {run_dir} is in use by another jmaml process (pid {os.getpid()}); wait "
                                 "for it to finish or stop it, or choose another --out")
            _held[real] = (held[0], held[1], held[2] + 1)
    if held is not None:
        try:
            yield
        finally:
            with _held_guard:
                owner, shared, depth = _held[real]
                _held[real] = (owner, shared, depth - 1)
        return
    path = os.path.join(run_dir, LOCK_FILE)
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ValueError(f"run dir {run_dir} is in use by another jmaml process (pid {holder}); wait for it "
                             "to finish or stop it, or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        with _held_guard:
            _held[real] = (me, share, 1)
        clean_stale_temporaries(run_dir)
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(real, None)
    finally:
        f.close()  # closing releases the lock


_TEMPORARY = re.compile(r".+\.tmp-(\d+)$")


def clean_stale_temporaries(run_dir: str) -> None:
    """Removes the ``FILE.tmp-PID`` files of an atomic write whose process is gone (killed mid-write):
    ``lock`` does it as it takes a run dir. A temporary of a live process is left alone."""
    for name in os.listdir(run_dir):
        m = _TEMPORARY.fullmatch(name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(run_dir, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


_RECORD_START = '{"phase": '  # how every line jmaml writes begins (json.dumps of a record, phase first)


def _torn(line: str) -> bool:
    """Whether an unterminated last line can be the start of a record jmaml was writing."""
    return line.startswith(_RECORD_START) or _RECORD_START.startswith(line)


def _ends_a_line(path: str) -> bool:
    """Whether a file is empty or ends with a newline."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a crash or a full disk mid-write: no newline
    at its end, and the start of a jmaml record) is dropped with a note on stderr; any other line that
    is not a jmaml record, the last one included, is an error naming the file and line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = [line for line in text.split("\n") if line.strip()]
    unterminated = bool(text) and not text.endswith("\n")
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not {"phase", "step"} <= set(record):
                raise ValueError("not a metrics record")
        except ValueError as e:
            if i == len(lines) - 1 and unterminated and _torn(line):
                print(f"jmaml: dropping the torn last line of {path} (it will be recomputed)", file=sys.stderr)
                break
            raise ValueError(f"{path}, line {i + 1}: not a jmaml metrics record ({e})") from None
        records.append(record)
    return records


def trim_metrics(path: str, keep_steps: dict[str, int], only: Iterable[str] | None = None) -> None:
    """Drops metrics lines past each phase's checkpointed step (they will be recomputed); with
    ``only``, lines of other phases are kept as they are."""
    if not os.path.exists(path):
        return
    only = None if only is None else set(only)
    kept = [r for r in read_metrics(path)
            if (only is not None and r["phase"] not in only) or r["step"] <= keep_steps.get(r["phase"], 0)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _allowed(changed: list[str], allow_changed: bool | Iterable[str]) -> bool:
    if isinstance(allow_changed, bool):
        return allow_changed
    allowed = set(allow_changed)
    return all(c in allowed for c in changed)


def changed_settings(old: dict, new: dict) -> list[str]:
    """The names of the settings that differ: top-level keys, and ``settings.KEY`` for the entries of
    a user's ``fingerprint=`` dict."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "settings" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"settings.{j}" for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
        else:
            out.append(k)
    return out


def checkpoints_beyond(run_dir: str, steps: int) -> dict[str, int]:
    """The checkpoints in ``run_dir`` whose step passes ``steps``, by file name: what a resume asked to run
    ``steps`` meta-steps would have to shorten (refused by ``jmaml train`` and ``jmaml rl``)."""
    from jmaml.engine import checkpoint

    held = {name: checkpoint.read_header(os.path.join(run_dir, name))["step"]
            for name in sorted(os.listdir(run_dir)) if name.endswith(".ckpt.npz")}
    return {name: step for name, step in held.items() if step > steps}


def xla_flags() -> str:
    """This process's ``XLA_FLAGS`` (XLA's library and code-generation switches, read when JAX's backend starts):
    recorded in a run's checkpoints, since XLA:CPU may pick other kernels under other flags and a bitwise resume
    holds only under the recorded ones."""
    return os.environ.get("XLA_FLAGS", "").strip()


def recorded_xla_flags(header: dict[str, Any]) -> str | None:
    """The ``XLA_FLAGS`` a checkpoint's run was written under (``open_run``'s record), or None where it records
    none (written before jmaml recorded them, or not by ``fit``)."""
    extra = header.get("extra")
    run = extra.get("fit") if isinstance(extra, dict) else None
    value = run.get("xla_flags") if isinstance(run, dict) else None
    return value if isinstance(value, str) else None


def open_run(run_dir: str, name: str, *, steps: int, resume: bool, overwrite: bool,
             allow_changed: bool | Iterable[str], fingerprint: str, settings: dict) -> tuple[str, dict]:
    """Checks what ``run_dir`` holds of run ``name`` against what ``fit`` was asked to do, clears it on
    ``overwrite``; returns the checkpoint's path and the record to store in its header (``"fit"``):
    fingerprint, settings and history. Called with the lock held, by the writing process.

    Raises:
      ValueError: the folder holds this run and neither ``resume`` nor ``overwrite`` was asked; a
        resume with other settings (naming them); ``resume`` without a checkpoint; a file of the
        run's names that is not a jmaml run's.
      checkpoint.CheckpointError: the checkpoint is unreadable or corrupted (nothing is overwritten).
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite contradict each other: pick one")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"run_dir {run_dir} exists and is not a folder")
    os.makedirs(run_dir, exist_ok=True)
    ckpt = os.path.join(run_dir, f"{name}.ckpt.npz")
    metrics = os.path.join(run_dir, METRICS_FILE)
    record: dict[str, Any] = {"fingerprint": fingerprint, "settings": settings, "history": [],
                              "xla_flags": xla_flags()}
    if os.path.exists(metrics):
        try:
            kept = read_metrics(metrics)
        except (ValueError, OSError) as e:
            raise ValueError(f"run_dir {run_dir} holds a {METRICS_FILE} that is not a jmaml run's ({e}); jmaml "
                             "will not write into it: choose another run_dir") from None
        if not _ends_a_line(metrics):  # a torn last line was dropped: the next must not be glued to it
            atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))
    if not os.path.exists(ckpt):
        if resume:
            raise ValueError(f"resume: there is no checkpoint {ckpt} to resume from")
        if os.path.exists(metrics) and any(r["phase"] == name for r in read_metrics(metrics)):
            if not overwrite:
                raise ValueError(f"run_dir {run_dir} holds metrics of run {name!r} but no checkpoint (it stopped "
                                 "before its first one): start it over with overwrite=True, or choose another "
                                 "run_dir")
            trim_metrics(metrics, {}, only=[name])
        return ckpt, record
    try:
        header, stored = checkpoint.read(ckpt)
        if "step" in stored:  # the header's step decides what is trimmed below: it must be the state's
            checkpoint.check_step(ckpt, header, {"step": stored["step"]})
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"{e} (jmaml does not replace a file it cannot read as its own: move it "
                                         "away to start over)") from None
    extra: dict[str, Any] = header["extra"] if isinstance(header.get("extra"), dict) else {}
    old = extra.get("fit") if isinstance(extra.get("fit"), dict) else None
    done = int(header["step"])
    if overwrite:
        owner = extra["phase"] if "phase" in extra else (name if old is not None else None)
        if owner != name:  # overwrite replaces this run's checkpoint, never another's or a stranger's
            what = f"run {owner!r}'s" if isinstance(owner, str) else "a checkpoint fit did not write (no run record)"
            raise ValueError(f"overwrite: {ckpt} is {what}, not run {name!r}'s; jmaml will not replace it: move it "
                             "away, or choose another run_dir")
        os.remove(ckpt)
        trim_metrics(metrics, {}, only=[name])
        record["history"] = [{"event": "overwrite", "previous_step": done, "at": _now()}]
        return ckpt, record
    if not resume:
        state = f"a finished run {name!r} ({done} steps)" if done >= steps else \
            f"run {name!r}, stopped at step {done} of its own"
        raise ValueError(f"run_dir {run_dir} already holds {state}: pass resume=True to continue it (a finished run "
                         "is returned as it is), overwrite=True to start over (its checkpoint and metrics lines are "
                         "replaced), or choose another run_dir")
    if "phase" in extra and extra["phase"] != name:
        raise checkpoint.CheckpointError(f"checkpoint {ckpt} holds run {extra['phase']!r}, not {name!r}")
    if done > steps:
        raise ValueError(f"resume with steps={steps}: {ckpt} is at step {done}; a run cannot be shortened "
                         "(evaluate it as it is, or start another run)")
    trim_metrics(metrics, {name: done}, only=[name])  # lines past the checkpoint will be recomputed
    recorded_flags = recorded_xla_flags(header)
    # not refused: the same arithmetic, perhaps other kernels
    if recorded_flags is not None and recorded_flags != record["xla_flags"]:
        print(f"jmaml: resuming run {name!r} under XLA_FLAGS={record['xla_flags']!r}; it was written under "
              f"XLA_FLAGS={recorded_flags!r}. XLA:CPU may choose other kernels, so the result may differ from an "
              "uninterrupted run in the last bits; set XLA_FLAGS to the recorded value for a bitwise resume (the "
              "jmaml command does so itself where XLA_FLAGS is unset)", file=sys.stderr)
    if old is not None:
        record["history"] = list(old.get("history", []))
        if old.get("fingerprint") != fingerprint:
            before = old.get("settings") if isinstance(old.get("settings"), dict) else {}
            changed = changed_settings(before, settings)
            lines = differences(before, settings)
            if not _allowed(changed, allow_changed):
                raise ValueError(f"resume: run {name!r} in {run_dir} was trained with other settings "
                                 f"({', '.join(changed) or 'its fingerprint'} changed: {'; '.join(lines)}). To "
                                 "continue its state with these settings on purpose, pass allow_changed=True (or "
                                 "the names of the settings that may change); to start over, overwrite=True")
            record["history"].append({"event": "changed settings", "at_step": done, "changed": changed,
                                      "details": lines, "at": _now()})
    return ckpt, record


def run_record(run_dir: str) -> tuple[str, str] | None:
    """``(kind, file)``: the kind of run ``run_dir`` records (``RUN_RECORDS``: ``"supervised"``, ``"rl"`` or
    ``"sweep"``) and the file that records it; None where nothing a recipe or a sweep recorded is there (an
    empty folder, or ``jmaml.fit``'s checkpoints alone)."""
    if not os.path.isdir(run_dir):
        return None
    for name, kind in RUN_RECORDS.items():
        if os.path.isfile(os.path.join(run_dir, name)):
            return kind, name
    return None


def refuse_other_kind(run_dir: str, kind: str, flag: str = "--out") -> None:
    """Raises ValueError when ``run_dir`` records a run of another kind than ``kind``: no command resumes,
    overwrites or writes beside another command's run."""
    found = run_record(run_dir)
    if found is not None and found[0] != kind:
        raise ValueError(f"{flag} {run_dir} holds another kind of run (a {_KIND_COMMANDS[found[0]]} run: {found[1]}); "
                         f"{_KIND_COMMANDS[kind]} will not resume, overwrite or write beside it: choose another folder")
