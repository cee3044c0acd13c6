"""The training loop: exact resume, interruption by signal, divergence stop, run-dir safety."""

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jmaml.engine import checkpoint
from jmaml.run import train
from jmaml.run.train import TrainConfig

TINY = TrainConfig(hidden=(8,), meta_batch_size=4, num_support=5, num_query=5, steps=40,
                   log_every=10, checkpoint_every=20)



def _metric_lines(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["phase"], r["step"], r["meta_loss"]) for r in rows]


def test_interrupted_then_resumed_run_equals_uninterrupted_run_bitwise(tmp_path):
    straight = train.train(TINY, str(tmp_path / "a"), stream=io.StringIO())
    with pytest.raises(train.Interrupted, match="stopped maml at step 20"):
        train.train(TINY, str(tmp_path / "b"), stop_at_step=20, stream=io.StringIO())
    assert checkpoint.read_header(tmp_path / "b" / "maml.ckpt.npz")["step"] == 20
    resumed = train.train(TINY, str(tmp_path / "b"), resume=True, stream=io.StringIO())
    for phase in ("maml", "pretrained"):
        a, b = checkpoint.host_leaves(straight[phase]), checkpoint.host_leaves(resumed[phase])
        assert len(a) == len(b)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)  # bitwise on CPU
    assert _metric_lines(tmp_path / "a") == _metric_lines(tmp_path / "b")
    assert int(resumed["maml"].step) == 40


def test_resume_can_extend_a_finished_run(tmp_path):
    train.train(TINY, str(tmp_path / "r"), stream=io.StringIO())
    longer = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "steps": 60})
    states = train.train(longer, str(tmp_path / "r"), resume=True, stream=io.StringIO())
    assert int(states["maml"].step) == 60
    assert train.load_config(str(tmp_path / "r")).steps == 60


def test_exploding_inner_loop_stops_the_run(tmp_path):
    # alpha = 10 with one step stays finite (Adam rescales the meta-steps) but the adapted loss
    # is orders of magnitude above the un-adapted one: reported, with the steps and tasks.
    cfg = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "inner_lr": 10.0})
    with pytest.raises(train.DivergenceError, match=r"MAML training diverged: exploding inner loop at step "
                                                    r"1: .* tasks \["):
        train.train(cfg, str(tmp_path / "x"), stream=io.StringIO())
    # an algorithm with learned rates names itself and its rates' meta rate
    cfg = dataclasses.replace(cfg, algo="metasgd", algo_options={"rate_meta_lr": 1e-5})
    with pytest.raises(train.DivergenceError, match=r"Meta-SGD training diverged: .*rate_meta_lr, now 1e-05"):
        train.train(cfg, str(tmp_path / "y"), stream=io.StringIO())


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "inner_lr": 10.0, "num_inner_steps": 5})
    with pytest.raises(train.DivergenceError, match=r"non-finite .* at step 1 .* tasks \[0, 1, 2, 3\]") as info:
        train.train(cfg, str(tmp_path / "d"), stream=io.StringIO())
    assert "inner rate" in str(info.value)
    state, header = checkpoint.restore(tmp_path / "d" / "maml.ckpt.npz", train.initial_state(cfg))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))


def test_corrupted_checkpoint_on_resume_is_a_clear_error_and_overwrites_nothing(tmp_path):
    run = tmp_path / "c"
    with pytest.raises(train.Interrupted):
        train.train(TINY, str(run), stop_at_step=20, stream=io.StringIO())
    ckpt = run / "maml.ckpt.npz"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(checkpoint.CheckpointError, match="corrupted or truncated"):
        train.train(TINY, str(run), resume=True, stream=io.StringIO())
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_output_dir_holding_a_different_run_is_refused_and_left_alone(tmp_path):
    run = tmp_path / "o"
    train.train(TINY, str(run), stream=io.StringIO())
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    other = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "inner_lr": 0.02})
    with pytest.raises(ValueError, match=r"already holds a different run \(inner_lr: 0.001 there, 0.02 asked\)"):
        train.train(other, str(run), stream=io.StringIO())
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    with pytest.raises(ValueError, match="contradict"):
        train.train(other, str(run), resume=True, overwrite=True)
    train.train(other, str(run), overwrite=True, stream=io.StringIO())
    assert train.load_config(str(run)).inner_lr == 0.02


def test_unfinished_run_without_resume_is_refused(tmp_path):
    with pytest.raises(train.Interrupted):
        train.train(TINY, str(tmp_path / "u"), stop_at_step=20, stream=io.StringIO())
    with pytest.raises(ValueError, match="unfinished run .* --resume"):
        train.train(TINY, str(tmp_path / "u"), stream=io.StringIO())


@pytest.mark.parametrize("change, match", [
    ({"steps": 0}, "steps must be >= 1"),
    ({"meta_batch_size": -2}, "meta_batch_size must be >= 1"),
    ({"num_support": 0}, "num_support must be >= 1"),
    ({"optimiser": "adagradx"}, "optimiser must be one of .*'adagradx'"),
    ({"activation": "swish"}, "activation must be one of .*'swish'"),
    ({"inner_lr": -1.0}, "inner_lr must be >= 0"),
    ({"meta_lr": 0.0}, "meta_lr must be > 0"),
    ({"checkpoint_every": 15}, "multiple of log_every"),
])
def test_bad_config_is_a_clear_error(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, **change}).validate()


def test_sigterm_writes_a_checkpoint_and_exits(tmp_path):
    run = tmp_path / "s"
    cmd = [sys.executable, "-m", "jmaml", "train", "--out", str(run), "--steps", "10000000",
           "--log-every", "20", "--checkpoint-every", "1000000", "--hidden", "8",
           "--meta-batch-size", "4", "--no-eval"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        metrics = run / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
            time.sleep(0.2)
        assert metrics.exists(), "training never started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err
    step = checkpoint.read_header(run / "maml.ckpt.npz")["step"]
    assert step > 0 and step % 20 == 0
