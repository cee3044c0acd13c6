"""A sweep is a run: ``jmaml sweep`` for every learner, checkpointed in its --out, resumed bitwise after
SIGKILL at random moments, stopped cleanly by SIGINT, refusing to start over an unfinished sweep."""

import csv
import os
import random
import signal
import time

import numpy as np
import procs
import pytest

from jmaml import cli
from jmaml.engine import checkpoint
from jmaml.run import rundir

SMALL = ["--hidden", "8", "--meta-batch-size", "4", "--shots", "5", "--query-shots", "5", "--beta", "0.001"]


def _rows(out):
    with open(out / "sweep.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("algo", ["metasgd", "cavia", "reptile"])
def test_every_learner_sweeps_from_the_cli(algo, tmp_path, capsys):
    out = tmp_path / algo
    args = ["sweep", "--algo", algo, "--alpha", "0.01,0.03", "--k", "1,2", "--steps", "20", "--log-every", "10",
            "--out", str(out), *SMALL]
    assert cli.main(args) == 0, capsys.readouterr().err
    rows = _rows(out)
    assert [(float(r["alpha"]), int(r["k"])) for r in rows] == [(0.01, 1), (0.01, 2), (0.03, 1), (0.03, 2)]
    for r in rows:
        assert np.isfinite(float(r["final_meta_loss"])) and np.isfinite(float(r["mse_1"])), r
        assert r["diverged"] == "False"
    ckpts = sorted(n for n in os.listdir(out) if n.endswith(".ckpt.npz"))
    # Meta-SGD fixes the learned rate's initial value when built: a population per (k, alpha)
    assert len(ckpts) == (4 if algo == "metasgd" else 2), ckpts
    assert all(checkpoint.read_header(out / n)["step"] == 20 for n in ckpts)
    capsys.readouterr()
    # a finished sweep is not silently redone; --resume shows it again without training
    assert cli.main(args) == 2 and "already holds a sweep" in capsys.readouterr().err
    assert cli.main([*args, "--resume"]) == 0
    assert _rows(out) == rows


def test_an_unfinished_sweep_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sweep", "--alpha", "0.01", "--steps", "20", "--log-every", "10", "--out", str(out), *SMALL]
    assert cli.main(args) == 0
    os.remove(out / "sweep.json")  # as a sweep stopped before its results were written
    assert cli.main(args) == 2
    assert "did not finish: continue it with --resume" in capsys.readouterr().err
    assert cli.main([*args, "--resume", "--overwrite"]) == 2
    assert cli.main([*args, "--overwrite"]) == 0


SWEEP = [*procs.JMAML, "sweep", "--algo", "reptile", "--alpha", "0.01,0.03", "--k", "1,2",
         "--steps", "600", "--log-every", "10", *SMALL]


def _run(out, *extra, kill_after=None, sig=signal.SIGKILL):
    return procs.run_killed([*SWEEP, "--out", str(out), *extra], kill_after=kill_after, sig=sig)


def test_sigkill_at_random_moments_then_resume_is_bitwise(tmp_path):
    t0 = time.monotonic()
    code, err = _run(tmp_path / "straight")
    assert code == 0, err
    duration = time.monotonic() - t0
    rng = random.Random(20261204)
    run, killed = tmp_path / "killed", 0
    for _ in range(12):  # until three kills landed (a sweep that finished first starts over)
        if killed >= 3:
            break
        # a fresh start is only ever explicit: --resume needs the recorded sweep (its plan) to continue
        mode = "--resume" if (run / "sweep-plan.json").exists() and not (run / "sweep.json").exists() else "--overwrite"
        code, err = _run(run, mode, kill_after=rng.uniform(0.1, 0.95) * duration)
        killed += code == -signal.SIGKILL
        assert code in (0, -signal.SIGKILL), err
    assert killed >= 3
    code, err = _run(run, "--resume")
    assert code == 0, err
    names = sorted(n for n in os.listdir(tmp_path / "straight") if n.endswith(".ckpt.npz"))
    assert names == ["sweep-k1.ckpt.npz", "sweep-k2.ckpt.npz"]
    for name in names:
        for a, b in zip(checkpoint._load(run / name)[1], checkpoint._load(tmp_path / "straight" / name)[1]):
            np.testing.assert_array_equal(a, b)
    assert _rows(run) == _rows(tmp_path / "straight")
    assert not [n for n in os.listdir(run) if ".tmp-" in n]
    lines = rundir.read_metrics(str(run / "metrics.jsonl"))
    for name in ("sweep-k1", "sweep-k2"):  # every chunk's line once, none lost or doubled
        assert [r["step"] for r in lines if r["phase"] == name] == list(range(10, 601, 10))


def test_sigint_stops_a_sweep_with_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "s"
    proc = procs.start([*SWEEP, "--steps", "100000", "--out", str(run)])
    deadline = time.monotonic() + 120
    while not (run / "sweep-k1.ckpt.npz").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "--resume" in err and "Traceback" not in err
    step = checkpoint.read_header(run / "sweep-k1.ckpt.npz")["step"]
    assert 10 <= step < 100000


def test_resume_continues_the_recorded_sweep_and_refuses_a_contradicting_flag(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sweep", "--out", str(out)]
    assert cli.main([*args, "--resume"]) == 2  # nothing recorded: a fresh start is only ever explicit
    assert "holds no sweep to resume" in capsys.readouterr().err
    grid = ["--alpha", "0.01,0.1", "--steps", "20", "--log-every", "10", *SMALL]
    assert cli.main([*args, *grid]) == 0
    rows = _rows(out)
    os.remove(out / "sweep.json")  # as a sweep stopped before its results were written
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 0  # no grid flag: the recorded grid, not the default 3x3
    assert _rows(out) == rows and len(rows) == 2
    capsys.readouterr()
    assert cli.main([*args, "--resume", "--alpha", "0.01,0.03"]) == 2
    err = capsys.readouterr().err
    assert "--alpha [0.01, 0.03] (recorded [0.01, 0.1])" in err and "Traceback" not in err
    assert cli.main([*args, "--resume", "--steps", "20", "--beta", "0.001"]) == 0  # agreeing flags are fine


def test_a_sweep_records_its_xla_flags_and_jmaml_sweep_resumes_under_them(tmp_path, monkeypatch, capsys):
    """Each population's checkpoint records the process's XLA_FLAGS (as fit's do); ``jmaml sweep --resume`` with
    XLA_FLAGS unset adopts them before JAX's backend starts, so a resumed sweep compiles as the first part did."""
    from jmaml.engine import runstore

    out = tmp_path / "s"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_xnnpack=false")
    assert cli.main(["sweep", "--out", str(out), "--alpha", "0.01", "--k", "1,2", "--steps", "10",
                     "--log-every", "10", *SMALL]) == 0
    names = sorted(p.name for p in out.iterdir() if p.name.endswith(".ckpt.npz"))
    assert names, sorted(p.name for p in out.iterdir())
    for name in names:
        assert runstore.recorded_xla_flags(checkpoint.read_header(out / name)) == "--xla_cpu_use_xnnpack=false"
    monkeypatch.delenv("XLA_FLAGS")
    capsys.readouterr()
    cli._use_recorded_xla_flags(cli.build_parser().parse_args(["sweep", "--out", str(out), "--resume"]))
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_xnnpack=false"
    assert "jmaml sweep: resuming with the run's recorded XLA_FLAGS" in capsys.readouterr().err


def test_sweep_takes_the_learners_options_and_checkpoint_every(tmp_path, capsys):
    out = tmp_path / "m"
    args = ["sweep", "--algo", "metasgd", "--alpha", "0.01", "--rate-meta-lr", "1e-4", "--steps", "20",
            "--log-every", "10", "--checkpoint-every", "20", "--out", str(out), *SMALL]
    assert cli.main(args) == 0, capsys.readouterr().err
    (name,) = [n for n in os.listdir(out) if n.endswith(".ckpt.npz")]
    assert checkpoint.read_header(out / name)["step"] == 20
    assert np.isfinite(float(_rows(out)[0]["mse_1"]))
    capsys.readouterr()
    bad = ["sweep", "--steps", "20", "--log-every", "10", "--checkpoint-every", "15", "--out", str(tmp_path / "b")]
    assert cli.main(bad) == 2 and "--checkpoint-every must be a positive multiple of --log-every (10)" in \
        capsys.readouterr().err
    assert cli.main(["sweep", "--algo", "reptile", "--first-order", "--out", str(tmp_path / "r")]) == 2


@pytest.mark.slow
def test_an_image_family_sweeps_from_the_cli_with_its_data_dir(tmp_path, capsys):
    from images_test import write_omniglot

    root = write_omniglot(str(tmp_path / "omniglot"))
    out = tmp_path / "o"
    args = ["sweep", "--task", "omniglot", "--data-dir", root, "--num-train-classes", "16", "--alpha", "0.4",
            "--beta", "0.001", "--steps", "4", "--log-every", "2", "--meta-batch-size", "2", "--out", str(out)]
    assert cli.main(args) == 0, capsys.readouterr().err
    (row,) = _rows(out)
    assert np.isfinite(float(row["mse_1"])) and row["diverged"] == "False"
    capsys.readouterr()
    assert cli.main(["sweep", "--task", "omniglot", "--out", str(tmp_path / "none")]) == 2
    assert "data" in capsys.readouterr().err.lower()
