"""What the tests that start processes share: a clean environment, the jmaml command, and runs that
can be killed part-way. One helper, so every process test starts its child the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JMAML = [sys.executable, "-m", "jmaml"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its XLA_/JAX_ settings (a test's flags must not leak into a
    child), on the CPU, with this checkout importable; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, **extra})
    return env


def run(args: list[str], *, env: dict[str, str] | None = None, cwd: str = ROOT,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Runs ``args`` to the end (text output captured); ``env`` defaults to ``clean_env()``."""
    return subprocess.run(args, env=clean_env() if env is None else env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def run_python(code: str, **kw) -> subprocess.CompletedProcess[str]:
    """Runs ``python -c code`` in a fresh interpreter (``run``'s keywords)."""
    return run([sys.executable, "-c", code], **kw)


def start(args: list[str], *, env: dict[str, str] | None = None, **kw) -> subprocess.Popen[str]:
    """Starts ``args`` (stdout and stderr piped, text) for a test that signals or waits on it."""
    return subprocess.Popen(args, env=clean_env() if env is None else env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run_killed(args: list[str], *, kill_after: float | None = None, sig: int = signal.SIGKILL,
               env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """Runs ``args``, sending ``sig`` after ``kill_after`` seconds if it is still running; returns its exit
    code (negative: the signal) and its stderr."""
    proc = start(args, env=env)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def kill_at_checkpoint(args: list[str], ckpt, *, before_step: int, env: dict[str, str] | None = None,
                       timeout: float = 300) -> int:
    """Runs ``args`` (output discarded) and sends SIGKILL once ``ckpt`` holds a checkpoint of a step in
    ``(0, before_step)``: a run killed mid-way with something to resume. Returns its exit code (``-SIGKILL``
    when it was killed; a run that finished first returns its own)."""
    import time

    from jmaml.engine import checkpoint

    proc = subprocess.Popen(args, env=clean_env() if env is None else env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(ckpt) and 0 < checkpoint.read_header(ckpt)["step"] < before_step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    return proc.wait(timeout=60)
