"""End-to-end: the `jmaml seed` walk-through and its tasks-file input."""

import json
import os
import subprocess
import sys

import numpy as np
import procs
import pytest

from jmaml import cli
from jmaml.core import analytic
from jmaml.run import walkthrough


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_seed_prints_the_seeds_numbers(capsys):
    code, out, _ = _run(capsys, "seed")
    assert code == 0
    for text in ("w(1)  = 0.8", "phi_1 = 0.6", "phi_2 = -8.2", "= 4.48", "= 3028.48",
                 "= -1515.48", "diverges", "-295.32"):
        assert text in out, text


def test_seed_json_values_and_k_table_against_the_closed_form(capsys):
    code, out, _ = _run(capsys, "seed", "--json")
    r = json.loads(out)
    assert code == 0
    assert r["conventional_w1"] == pytest.approx(0.8, abs=1e-9)
    assert r["phi"] == pytest.approx([0.6, -8.2], abs=1e-9)
    assert r["query_grads"] == pytest.approx([4.48, 3028.48], abs=1e-9)
    assert r["theta1"] == pytest.approx(-1515.48, abs=1e-9)
    assert [row["k"] for row in r["k_table"]] == [1, 2, 3, 4, 5]
    for row in r["k_table"]:
        for j, xs in enumerate(([2.0, 3.0], [5.0, 6.0])):
            want = analytic.dW_dtheta(xs, 0.1, row["k"])
            assert abs(row["dW_dtheta"][j] - want) <= 1e-12 * max(1.0, abs(want))
    assert r["diverges"] is True
    # Hessian-based bound on S2 equals the exact 1/sum(x^2).
    assert r["stability"][1]["alpha_bound"] == pytest.approx(1 / 61, rel=1e-12)


def test_seed_with_own_tasks_file(tmp_path, capsys):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"tasks": [
        {"support": {"x": [0.5, 1.0], "y": [1.0, 2.0]}, "query": {"x": [2.0], "y": [3.0]}},
        {"support": {"x": [1.0, -1.0, 0.2], "y": [0.0, 1.0, 0.5]}, "query": {"x": [1.5], "y": [1.0]}},
    ]}))
    code, out, _ = _run(capsys, "seed", "--tasks", str(path), "--alpha", "0.05", "--beta", "0.1",
                        "--k", "3", "--json")
    r = json.loads(out)
    assert code == 0 and "conventional_w1" not in r
    tasks = [([0.5, 1.0], [1.0, 2.0], [2.0], [3.0]), ([1.0, -1.0, 0.2], [0.0, 1.0, 0.5], [1.5], [1.0])]
    assert r["theta1"] == pytest.approx(analytic.meta_step(1.0, tasks, 0.05, 0.1), abs=1e-12)
    assert r["diverges"] is False


@pytest.mark.parametrize("doc, match", [
    ({}, "missing the key 'tasks'"),
    ({"tasks": [{"support": {"x": [1.0], "y": [1.0]}}]}, r"tasks\[0\] is missing the key 'query'"),
    ({"tasks": [{"support": {"x": [1.0]}, "query": {"x": [1.0], "y": [1.0]}}]},
     r"tasks\[0\].support is missing the key 'y'"),
    ({"tasks": [{"support": {"x": [1.0, 2.0], "y": [1.0]}, "query": {"x": [1.0], "y": [1.0]}}]},
     r"tasks\[0\].support.x and .*same length, got 2 and 1"),
    ({"tasks": [{"support": {"x": [[1.0], 2.0], "y": [1.0, 2.0]}, "query": {"x": [1.0], "y": [1.0]}}]},
     r"tasks\[0\].support.x\[0\] is a list"),
    ({"tasks": [{"support": {"x": ["a"], "y": [1.0]}, "query": {"x": [1.0], "y": [1.0]}}]},
     r"tasks\[0\].support.x\[0\] must be a number, got 'a'"),
    ({"tasks": [{"support": {"x": [], "y": []}, "query": {"x": [1.0], "y": [1.0]}}]},
     r"tasks\[0\].support.x must hold at least one number"),
])
def test_malformed_tasks_json(tmp_path, capsys, doc, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises((ValueError, TypeError), match=match):
        walkthrough.load_tasks_json(str(path))
    code, _, err = _run(capsys, "seed", "--tasks", str(path))
    assert code == 2 and "error" in err


def test_tasks_file_that_is_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        walkthrough.load_tasks_json(str(path))


def test_bad_flags_are_clear_errors(capsys):
    assert _run(capsys, "seed", "--k", "-1")[0] == 2
    assert _run(capsys, "seed", "--alpha", "nan")[0] == 2


def test_console_entry_point_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "jmaml", "seed", "--k", "1"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "-1515.48" in proc.stdout


def test_train_eval_plot_end_to_end(tmp_path, capsys):
    run = str(tmp_path / "run")
    argv = ["train", "--out", run, "--steps", "30", "--log-every", "10", "--hidden", "8",
            "--meta-batch-size", "4"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert "| maml | 10 | 0.001 |" in out and "| pretrained | 10 |" in out
    for name in ("config.json", "metrics.jsonl", "maml.ckpt.npz", "pretrained.ckpt.npz", "eval.json",
                 "eval.md", "plots/fits.png", "plots/curves.png"):
        assert (tmp_path / "run" / name).exists(), name
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert results["protocol"]["held_out_tasks"] == 600
    assert set(results["maml"]) == {"5", "10", "20"} and len(results["maml"]["10"]["mean"]) == 11
    # jmaml inspect lists it: config, each checkpoint's key paths and shapes, the last metrics.
    code, out, err = _run(capsys, "inspect", run)
    assert code == 0, err
    assert "config: task=sinusoid, algo=maml" in out and "maml.ckpt.npz: step 30" in out
    assert "params/1/w" in out and "8x1" in out and "last metrics (maml, step 30)" in out
    code, out, _ = _run(capsys, "inspect", run, "--json")
    info = json.loads(out)
    shapes = {a["key"]: a["shape"] for a in info["checkpoints"][0]["arrays"]}
    assert shapes["params/0/w"] == [1, 8] and shapes["opt_state/0/mu/1/b"] == [1]
    assert info["checkpoints"][0]["num_params"] == 1 * 8 + 8 + 8 * 1 + 1  # --hidden 8: one hidden layer
    code, _, err = _run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "not a jmaml run dir" in err
    # Running the same command again finds the finished run and does not retrain or re-evaluate.
    eval_mtime = (tmp_path / "run" / "eval.json").stat().st_mtime
    code, out, err = _run(capsys, *argv)
    assert code == 0 and "| maml | 10 |" in out and "already trained and evaluated" in err
    assert (tmp_path / "run" / "eval.json").stat().st_mtime == eval_mtime
    # A different run into the same folder is refused.
    code, _, err = _run(capsys, *argv[:-1], "8", "--inner-lr", "0.5")
    assert code == 2 and "different run" in err


def test_train_bad_flags(tmp_path, capsys):
    assert _run(capsys, "train", "--out", str(tmp_path / "x"), "--steps", "0")[0] == 2
    assert _run(capsys, "train", "--out", str(tmp_path / "x"), "--optimiser", "nope")[0] == 2
    code, _, err = _run(capsys, "train", "--out", str(tmp_path / "x"), "--activation", "swish", "--steps", "5")
    assert code == 2 and "activation must be one of" in err


def test_train_divergence_exits_with_a_message(tmp_path, capsys):
    code, _, err = _run(capsys, "train", "--out", str(tmp_path / "d"), "--steps", "40", "--log-every", "10",
                        "--hidden", "8", "--meta-batch-size", "4", "--inner-lr", "10")
    assert code == 3 and "diverged" in err and "exploding inner loop at step 1:" in err


def test_the_command_caches_compiled_programs_and_a_warm_start_is_bitwise(tmp_path):
    from jmaml.engine import checkpoint

    env = procs.clean_env(JMAML_COMPILE_CACHE=str(tmp_path / "cache"))
    args = ["train", "--steps", "20", "--log-every", "10", "--hidden", "8", "--no-eval", "--no-pretrain"]
    for name in ("cold", "warm"):
        proc = subprocess.run([sys.executable, "-m", "jmaml", *args, "--out", str(tmp_path / name)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        if name == "cold":
            assert os.listdir(tmp_path / "cache"), "nothing was cached"
    cold, warm = (checkpoint._load(tmp_path / n / "maml.ckpt.npz")[1] for n in ("cold", "warm"))
    assert all(np.array_equal(a, b) for a, b in zip(cold, warm))


def test_the_compile_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("JMAML_COMPILE_CACHE", "off")
    assert cli.compile_cache_dir() is None
    monkeypatch.setenv("JMAML_COMPILE_CACHE", str(tmp_path))
    assert cli.compile_cache_dir() == str(tmp_path)
    monkeypatch.delenv("JMAML_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.compile_cache_dir() == os.path.join(str(tmp_path / "xdg"), "jmaml", "xla")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # the user's own JAX setting wins
    assert cli.compile_cache_dir() == str(tmp_path / "jax")
