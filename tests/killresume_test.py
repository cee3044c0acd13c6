"""SIGKILL at random moments — start-up, compilation, mid-chunk, mid-checkpoint — then resume:
the finished run is bitwise the run that was never interrupted."""

import os
import random
import signal
import time

import numpy as np
import procs

from jmaml.engine import checkpoint
from jmaml.run import rundir

TRAIN = [*procs.JMAML, "train", "--hidden", "8", "--meta-batch-size", "4", "--shots", "5",
         "--query-shots", "5", "--steps", "3000", "--log-every", "10", "--checkpoint-every", "10", "--no-pretrain",
         "--no-eval"]


def _run(out, *extra, kill_after=None):
    return procs.run_killed([*TRAIN, "--out", str(out), *extra], kill_after=kill_after)


def test_sigkill_at_random_points_then_resume_is_bitwise(tmp_path):
    t0 = time.monotonic()
    code, err = _run(tmp_path / "straight")
    assert code == 0, err
    duration = time.monotonic() - t0  # kill at moments spread over a whole run, start-up included
    rng = random.Random(20261127)
    run, killed = tmp_path / "killed", 0
    for _ in range(20):  # until three kills landed (a run that finished first starts over: timings vary)
        if killed >= 3:
            break
        ckpt = run / "maml.ckpt.npz"
        finished = ckpt.exists() and checkpoint.read_header(ckpt)["step"] == 3000
        mode = ["--resume"] if os.path.exists(run / "config.json") and not finished else ["--overwrite"]
        code, err = _run(run, *mode, kill_after=rng.uniform(0.1, 0.9) * duration)
        killed += code == -signal.SIGKILL
        if code == 2 and "holds no checkpoint" in err:  # killed before its first checkpoint: nothing to lose
            code, err = _run(run, "--overwrite", kill_after=rng.uniform(0.1, 0.9) * duration)
            killed += code == -signal.SIGKILL
        assert code in (0, -signal.SIGKILL, 2), err
    assert killed >= 3  # the loop did interrupt the run
    mode = ["--resume"] if os.path.exists(run / "config.json") else ["--overwrite"]
    for _ in range(3):  # finish it
        code, err = _run(run, *mode)
        if code == 0:
            break
        if "holds no checkpoint" in err:  # the last kill came before the run's first checkpoint
            mode = ["--overwrite"]
    assert code == 0, err
    assert checkpoint.read_header(run / "maml.ckpt.npz")["step"] == 3000
    for a, b in zip(checkpoint._load(run / "maml.ckpt.npz")[1], checkpoint._load(tmp_path / "straight" /
                                                                                 "maml.ckpt.npz")[1]):
        np.testing.assert_array_equal(a, b)
    assert not [n for n in os.listdir(run) if ".tmp-" in n]  # no half-written file left behind
    steps = [r["step"] for r in rundir.read_metrics(str(run / "metrics.jsonl"))]
    assert steps == list(range(10, 3001, 10))  # every chunk's line once, none lost or doubled


def test_a_signal_during_start_up_is_honoured_not_lost(tmp_path):
    # sent while Python imports JAX: the entry point's handler records it, and the run stops at its
    # first chance with a checkpoint and the signal's status (no raw KeyboardInterrupt trace)
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = tmp_path / sig.name
        proc = procs.start([*TRAIN, "--out", str(out)])
        time.sleep(0.5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, err[-2000:]
        assert "Traceback" not in err and sig.name in err
        assert checkpoint.read_header(out / "maml.ckpt.npz")["step"] == 0  # resumable from the start
