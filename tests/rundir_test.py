"""Nothing lost, nothing silently wrong: run-dir ownership and lock, checkpoints bound to their run
and phase, --resume never starting fresh, atomic and tolerant files, strict config types."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jmaml import Logging
from jmaml.engine import checkpoint
from jmaml.run import evaluate, rundir, train
from jmaml.run.config import TrainConfig

TINY = TrainConfig(hidden=(8,), meta_batch_size=4, num_support=5, num_query=5, steps=20, log_every=10,
                   checkpoint_every=10, pretrain=True)


def _train(run_dir, config=TINY, **kw):
    return train.train(config, str(run_dir), stream=io.StringIO(), **kw)


def test_overwrite_never_deletes_a_folder_that_is_not_a_jmaml_run(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    files = {"config.json": '{"learning_rate": 3}', "eval.json": "{}", "model.ckpt.npz": "weights"}
    for name, text in files.items():
        (theirs / name).write_text(text)
    for overwrite in (True, False):
        with pytest.raises(ValueError, match="not a jmaml run's; jmaml will not") as e:
            _train(theirs, overwrite=overwrite)
        if overwrite:
            assert "config.json, eval.json, model.ckpt.npz" in str(e.value)
    assert {n: (theirs / n).read_text() for n in files} == files  # untouched


def test_overwrite_replaces_a_finished_run_with_its_plots_and_keeps_the_users_files(tmp_path):
    run = tmp_path / "run"
    _train(run)
    (run / "plots").mkdir()
    (run / "plots" / "curves.png").write_bytes(b"the old run's figure")  # what `jmaml train` writes
    (run / "notes.txt").write_text("mine")
    _train(run, overwrite=True)  # was: the run's files deleted, then "not empty and holds no jmaml run"
    assert checkpoint.read_header(run / "maml.ckpt.npz")["step"] == 20 and (run / "config.json").exists()
    assert not (run / "plots").exists() and (run / "notes.txt").read_text() == "mine"


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with rundir.lock(str(run)):
        with pytest.raises(ValueError, match=rf"in use by another jmaml process \(pid {os.getpid()}\)"):
            _train(run, overwrite=True)
    _train(run)  # released: the run goes ahead
    assert checkpoint.read_header(run / "maml.ckpt.npz")["step"] == 20


def test_resume_never_starts_a_fresh_run(tmp_path):
    with pytest.raises(ValueError, match="holds no jmaml run to resume"):
        _train(tmp_path / "typo", resume=True)
    assert not (tmp_path / "typo").exists()  # nothing left behind
    run = tmp_path / "run"
    with pytest.raises(train.Interrupted):
        _train(run, stop_at_step=10)
    os.remove(run / "maml.ckpt.npz")
    with pytest.raises(ValueError, match="holds no checkpoint of its maml phase"):
        _train(run, resume=True)


def test_a_checkpoint_of_another_run_or_phase_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a)
    other = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "seed": 1})
    with pytest.raises(train.Interrupted):
        _train(b, other, stop_at_step=10)
    shutil.copy(a / "maml.ckpt.npz", b / "maml.ckpt.npz")  # same shapes, other seed
    with pytest.raises(checkpoint.CheckpointError, match="belongs to another run"):
        _train(b, other, resume=True)
    # the meta-learner's checkpoint copied over the baseline's is not evaluated as the baseline
    shutil.copy(a / "maml.ckpt.npz", a / "pretrained.ckpt.npz")
    with pytest.raises(checkpoint.CheckpointError, match="holds phase 'maml', not 'pretrained'"):
        evaluate.evaluate_run(str(a), num_tasks=10, write=False)


def test_torn_metrics_line_is_dropped_on_resume_and_a_bad_middle_line_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(train.Interrupted):
        _train(run, stop_at_step=10)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"phase": "maml", "step": 20, "meta_lo')  # a crash or a full disk mid-line
    _train(run, resume=True)
    assert "dropping the torn last line" in capsys.readouterr().err
    records = rundir.read_metrics(str(run / "metrics.jsonl"))
    assert [(r["phase"], r["step"]) for r in records] == [("maml", 10), ("maml", 20), ("pretrained", 10),
                                                          ("pretrained", 20)]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a jmaml metrics record"):
        rundir.read_metrics(str(run / "metrics.jsonl"))


def _fit(run_dir, **kw):
    import jax
    import optax

    import jmaml
    from jmaml.core import models
    from jmaml.core.losses import make_loss

    model = models.mlp([1, 8, 1], "relu")
    learner = jmaml.learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
    return jmaml.fit(learner, jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5), optax.adam(1e-3),
                     model.init(jax.random.key(0)), steps=10, meta_batch_size=2,
                     run=jmaml.RunDir(str(run_dir), checkpoint_every=10, **kw),
                     log=Logging(every=10, progress=False))


@pytest.mark.parametrize("text", ["hello world\n", "hello world", '{"step": 3}\n', '{"phase": "x", "step": 1}\nnope\n'])
def test_a_metrics_file_holding_a_foreign_line_is_refused_not_appended_to(tmp_path, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match="holds a metrics.jsonl that is not a jmaml run's"):
        _fit(run)
    assert (run / "metrics.jsonl").read_text() == text  # untouched


def test_a_torn_last_line_is_never_glued_to_the_next_record(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"phase": "other", "step": 5}\n{"phase": "oth')  # a crash mid-line
    _fit(run)
    assert "dropping the torn last line" in capsys.readouterr().err
    records = rundir.read_metrics(str(run / "metrics.jsonl"))
    assert [(r["phase"], r["step"]) for r in records] == [("other", 5), ("maml", 10)]


def test_stale_temporaries_are_cleaned_and_results_written_atomically(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(train.Interrupted):
        _train(run, stop_at_step=10)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a writer that died mid-write: its pid is no longer running
    (run / f"maml.ckpt.npz.tmp-{gone.pid}").write_bytes(b"half a checkpoint")
    (run / f"maml.ckpt.npz.tmp-{os.getppid()}").write_bytes(b"a live writer's")  # left alone
    _train(run, resume=True)
    assert [n for n in os.listdir(run) if ".tmp-" in n] == [f"maml.ckpt.npz.tmp-{os.getppid()}"]
    os.remove(run / f"maml.ckpt.npz.tmp-{os.getppid()}")
    evaluate.evaluate_run(str(run), num_tasks=10)
    assert not [n for n in os.listdir(run) if ".tmp-" in n]
    assert json.loads((run / "eval.json").read_text())["algo"] == "maml"


@pytest.mark.parametrize("key, value, match", [
    ("pretrain", "false", "pretrain must be true or false, got 'false'"),
    ("remat", 1, "remat must be true or false"),
    ("hidden", [8, "8"], r"hidden\[1\] must be a positive int"),
    ("algo", 3, "algo must be a string"),
])
def test_config_json_types_are_strict_and_errors_name_the_file(tmp_path, key, value, match):
    run = tmp_path / "run"
    _train(run)
    info = json.loads((run / "config.json").read_text())
    info["config"][key] = value
    (run / "config.json").write_text(json.dumps(info))
    with pytest.raises((TypeError, ValueError), match=match) as e:
        rundir.load_config(str(run))
    assert str(run / "config.json") in str(e.value)


def test_resume_of_an_unchanged_run_is_still_bitwise(tmp_path):
    straight = _train(tmp_path / "a")
    with pytest.raises(train.Interrupted):
        _train(tmp_path / "b", stop_at_step=10)
    resumed = _train(tmp_path / "b", resume=True)
    for u, v in zip(checkpoint.host_leaves(straight["maml"]), checkpoint.host_leaves(resumed["maml"])):
        np.testing.assert_array_equal(u, v)
    assert checkpoint.read_header(tmp_path / "b" / "maml.ckpt.npz")["extra"]["run"] == rundir.run_fingerprint(TINY)


def test_seed_walkthrough_names_non_finite_results_instead_of_concluding():
    from jmaml import Batch, Task
    from jmaml.run import walkthrough

    task = Task(Batch(np.array([1e200, 2.0]), np.array([1.0, 2.0])), Batch(np.array([1.0]), np.array([1.0])))
    result = walkthrough.run_walkthrough(tasks=[task], k_max=2)
    assert "theta1" in result["non_finite"] and result["stability"][0]["diverges"] is None
    text = walkthrough.format_walkthrough(result)
    assert "Not finite in float64" in text and "contracts" not in text


def test_zero_intervals_are_named_errors(tmp_path, capsys):
    from jmaml import cli

    for flag in ("--log-every", "--checkpoint-every", "--steps"):
        code = cli.main(["train", flag, "0", "--out", str(tmp_path / "r"), "--no-eval"])
        assert code == 2 and f"{flag} must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_signal_during_the_last_chunk_still_stops_with_its_status(tmp_path):
    import signal

    import jax
    import optax

    from jmaml import fit, learners, make_loss, tasks
    from jmaml.core import models

    model = models.mlp([1, 8, 1])
    learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
    kill_at_end = lambda record, state: record["step"] == 20 and os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(train.Interrupted, match="SIGTERM received: maml finished its 20 steps") as e:
        fit(learner, tasks.sinusoid.distribution(), optax.adam(1e-3), model.init(jax.random.key(0)), steps=20,
            meta_batch_size=4, run=str(tmp_path), log=Logging(every=10, callback=kill_at_end, progress=False))
    assert e.value.signum == signal.SIGTERM
    assert checkpoint.read_header(tmp_path / "maml.ckpt.npz")["step"] == 20


def test_an_unusable_sweep_out_fails_before_the_sweep_runs(tmp_path, capsys):
    from jmaml import cli

    (tmp_path / "file").write_text("not a folder")
    code = cli.main(["sweep", "--out", str(tmp_path / "file" / "sweep"), "--steps", "100000"])
    assert code == 2 and "--out" in capsys.readouterr().err


def test_sweep_evaluation_in_memory_sized_chunks_equals_one_call():
    from jmaml.run import sweep

    base = TrainConfig(hidden=(8,), meta_batch_size=4, num_support=5, num_query=5, steps=10, log_every=10,
                       checkpoint_every=10)
    grid = sweep.Grid(alphas=(0.01, 0.02, 0.03), betas=(1e-3,), ks=(1,), seeds=(0,))
    one = sweep.run_sweep(base, grid, eval_tasks=20, diag_tasks=4)
    # a budget that fits training but only one point's evaluation at a time
    small = sweep.run_sweep(base, grid, eval_tasks=20, diag_tasks=4, memory_budget_bytes=3 * 10**6)
    for a, b in zip(one["rows"], small["rows"]):
        np.testing.assert_allclose(a["mse_curve"], b["mse_curve"], rtol=1e-5)


@pytest.mark.parametrize("content, match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not valid JSON"),
    (b'{"tasks": [{"support": {"x": [1], "y": [1]}, "query": {"x": [1], "y": [1]}}], "extra": 1}',
     r"unknown keys \['extra'\]"),
    (b'{"tasks": [{"support": {"x": [1], "y": [1], "z": [0]}, "query": {"x": [1], "y": [1]}}]}',
     r"unknown keys \['z'\]"),
])
def test_tasks_json_is_read_within_limits_with_named_errors(tmp_path, content, match):
    from jmaml.run import walkthrough

    path = tmp_path / "tasks.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        walkthrough.load_tasks_json(str(path))


def test_tasks_json_that_is_a_folder_or_endless_is_named(tmp_path):
    from jmaml.run import walkthrough

    with pytest.raises(ValueError, match="is a folder"):
        walkthrough.load_tasks_json(str(tmp_path))
    if os.path.exists("/dev/zero"):
        with pytest.raises(ValueError, match="larger than 16 MiB"):
            walkthrough.load_tasks_json("/dev/zero")


def test_huge_integers_and_os_errors_are_one_line(tmp_path, capsys):
    from jmaml import cli

    with pytest.raises(ValueError, match="must be <= 2147483647"):
        TrainConfig(steps=10**23).validate()
    with pytest.raises(ValueError, match="seed must be <= 2147483647"):
        TrainConfig(seed=10**23).validate()
    (tmp_path / "file").write_text("a file where a folder is needed")
    code = cli.main(["train", "--out", str(tmp_path / "file" / "run"), "--steps", "10", "--no-eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(tmp_path / "file") in err[0], err


def test_resume_cannot_shorten_a_run_or_mix_precisions(tmp_path):
    import jax

    from jmaml.core._util import enable_x64

    run = tmp_path / "run"
    _train(run)
    shorter = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "steps": 10})
    before = (run / "config.json").read_text()
    with pytest.raises(ValueError, match="a run cannot be shortened"):
        _train(run, shorter, resume=True)
    assert (run / "config.json").read_text() == before  # nothing rewritten
    longer = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "steps": 30})
    assert checkpoint.read_header(run / "maml.ckpt.npz")["extra"]["x64"] is bool(jax.config.jax_enable_x64)
    with enable_x64(not jax.config.jax_enable_x64), pytest.raises(checkpoint.CheckpointError,
                                                                  match="written with jax_enable_x64"):
        _train(run, longer, resume=True)


def test_eval_inner_steps_applies_to_sinusoid(tmp_path):
    config = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "eval_inner_steps": 4})
    _train(tmp_path / "run", config)
    results = evaluate.evaluate_run(str(tmp_path / "run"), num_tasks=10, write=False)
    assert len(results["maml"]["10"]["mean"]) == 5 and len(results["pretrained"]["10"]["mean"]) == 5


def test_a_divergence_stopped_run_continues_with_changed_settings_only_on_purpose(tmp_path):
    run = tmp_path / "run"
    wild = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "inner_lr": 10.0, "num_inner_steps": 5,
                          "pretrain": False})
    with pytest.raises(train.DivergenceError, match="--resume --allow-changed-settings") as e:
        _train(run, wild)
    assert "--overwrite" not in str(e.value)  # the kept state is never suggested away
    tame = TrainConfig(**{**wild.to_dict(), "hidden": TINY.hidden, "inner_lr": 0.01})
    with pytest.raises(ValueError, match="--resume --allow-changed-settings"):
        _train(run, tame, resume=True)
    state = _train(run, tame, resume=True, allow=("changed-settings",))["maml"]
    assert int(state.step) == 20
    info = json.loads((run / "config.json").read_text())
    assert info["config"]["inner_lr"] == 0.01
    assert info["changes"][0]["from"] == {"inner_lr": 10.0} and info["changes"][0]["to"] == {"inner_lr": 0.01}
    assert checkpoint.read_header(run / "maml.ckpt.npz")["extra"]["run"] == rundir.run_fingerprint(tame)


def test_a_sweep_reports_its_finished_points_as_chunks_end(tmp_path):
    from jmaml.run import sweep

    base = TrainConfig(hidden=(8,), meta_batch_size=4, num_support=5, num_query=5, steps=10, log_every=10,
                       checkpoint_every=10)
    grid = sweep.Grid(alphas=(0.01, 0.02, 0.03), betas=(1e-3,), ks=(1,), seeds=(0,))
    seen = []
    point = sweep.estimate_point_bytes(base, 1, 8 * 3 + 1)
    sweep.run_sweep(base, grid, evaluate=False, memory_budget_bytes=point,  # one point per chunk
                    on_chunk=lambda rows: (seen.append(len(rows)), sweep.write_rows(rows, str(tmp_path))))
    assert seen == [1, 2, 3]
    assert len((tmp_path / "sweep.csv").read_text().strip().splitlines()) == 4  # header + 3 rows


def test_a_run_too_large_for_the_device_fails_before_it_starts_and_leaves_nothing(tmp_path):
    huge = TrainConfig(hidden=(400, 400), meta_batch_size=200_000, num_support=100, num_query=100, steps=10,
                       log_every=10, checkpoint_every=10, num_inner_steps=5, pretrain=False)
    with pytest.raises(ValueError, match=r"needs about [\d.]+ GiB of device memory, more than the"):
        _train(tmp_path / "run", huge)  # XLA's memory analysis of the compiled chunk, before it runs
    assert not (tmp_path / "run").exists()


def test_a_truncated_eval_json_is_recomputed_by_train_and_named_by_plot(tmp_path, capsys):
    from jmaml import cli
    from jmaml.run import plot

    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--steps", "10", "--log-every", "10", "--hidden", "8", "--meta-batch-size",
            "4", "--no-pretrain", "--no-plot"]
    assert cli.main(argv) == 0
    (run / "eval.json").write_text('{"protocol": {"held_out')  # as an older version could leave it
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="eval.json is not valid JSON"):
        plot.plot_run(str(run))
    os.utime(run / "eval.json")  # newer than the checkpoints: train would reuse it
    assert cli.main(argv) == 0 and "| maml | 10 |" in capsys.readouterr().out
    assert json.loads((run / "eval.json").read_text())["algo"] == "maml"


def test_seed_walkthrough_table_is_bounded():
    from jmaml.run import walkthrough

    with pytest.raises(ValueError, match="k must be <= 100"):
        walkthrough.run_walkthrough(k_max=101)


def test_every_committed_run_binds_to_its_own_checkpoints():
    """Runs written by older jmaml versions (fingerprinted before TrainConfig grew fields such as cache_dir)
    still resume: each committed checkpoint that records a run fingerprint passes the binding check."""
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checked = 0
    for ckpt in sorted(glob.glob(os.path.join(root, "experiments", "**", "*.ckpt.npz"), recursive=True)):
        header = checkpoint.read_header(ckpt)
        if "run" not in header.get("extra", {}):
            continue
        run_dir = os.path.dirname(ckpt)
        phase = os.path.basename(ckpt)[:-len(".ckpt.npz")]
        rundir.check_binding(ckpt, header, rundir.load_config(run_dir), phase)
        checked += 1
    assert checked >= 4  # the sinusoid run's two phases and the precision experiment's two runs
