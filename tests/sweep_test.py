"""Sweeps: a grid point equals the single run with the same settings; chunking is transparent."""

import dataclasses
import io

import jax
import numpy as np
import pytest

from jmaml.run import sweep, train
from jmaml.run.train import TrainConfig

BASE = TrainConfig(hidden=(8,), meta_batch_size=4, num_support=5, num_query=5, steps=30, log_every=10,
                   checkpoint_every=30, pretrain=False)
GRID = sweep.Grid(alphas=(0.01, 0.05), betas=(1e-2,), ks=(1, 3), seeds=(0, 1))
# Float32 tolerance: the sweep's masked k-scan and injected meta rate compute the single run's
# numbers in another order (and in batched kernels), so they agree to round-off, not bitwise.
RTOL, ATOL = 2e-4, 2e-5


@pytest.fixture(scope="module")
def swept():
    return sweep.run_sweep(BASE, GRID, task_seed=0, eval_tasks=20, diag_tasks=4, keep_params=True)


def test_every_grid_point_equals_the_single_run_with_the_same_settings(swept, tmp_path):
    rows, params = swept["rows"], swept["params"]
    assert len(rows) == 8
    checked = 0
    for row, p in zip(rows, params):
        if (row["alpha"], row["seed"]) not in ((0.05, 0), (0.01, 1)):
            continue  # half of the grid, every k and seed, keeps the test fast
        cfg = dataclasses.replace(BASE, inner_lr=row["alpha"], meta_lr=row["beta"], num_inner_steps=row["k"],
                                  seed=row["seed"], task_seed=0)
        single = train.train(cfg, str(tmp_path / f"r{checked}"), stream=io.StringIO())["maml"].params
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(single)):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
        checked += 1
    assert checked == 4


def test_all_points_see_the_same_tasks_so_seed_only_changes_the_start(swept):
    rows = swept["rows"]
    a = [r for r in rows if r["seed"] == 0]
    b = [r for r in rows if r["seed"] == 1]
    assert [(r["alpha"], r["beta"], r["k"]) for r in a] == [(r["alpha"], r["beta"], r["k"]) for r in b]
    assert any(r1["final_meta_loss"] != r2["final_meta_loss"] for r1, r2 in zip(a, b))


def test_chunking_is_transparent(swept):
    small = sweep.estimate_point_bytes(BASE, 3, 8 * 2 + 8 + 8 + 1) * 3  # room for 3 points: 3 chunks
    chunked = sweep.run_sweep(BASE, GRID, task_seed=0, memory_budget_bytes=small, evaluate=False)
    assert chunked["meta"]["points_per_chunk"] == 3 and chunked["meta"]["num_chunks"] == 3
    for r1, r2 in zip(swept["rows"], chunked["rows"]):
        assert (r1["alpha"], r1["beta"], r1["k"], r1["seed"]) == (r2["alpha"], r2["beta"], r2["k"], r2["seed"])
        np.testing.assert_allclose(r1["final_meta_loss"], r2["final_meta_loss"], rtol=RTOL)


def test_results_table_files(swept, tmp_path):
    paths = sweep.write_results({"rows": swept["rows"], "meta": swept["meta"]}, str(tmp_path))
    names = {p.split("/")[-1] for p in paths}
    assert {"sweep.csv", "sweep.json", "heatmap_k1.png", "heatmap_k3.png"} <= names
    header = (tmp_path / "sweep.csv").read_text().splitlines()[0]
    assert header.startswith("alpha,beta,k,seed,final_meta_loss,mse_1,mse_5,mse_10")
    assert len((tmp_path / "sweep.csv").read_text().splitlines()) == 9


def test_seed_aggregates_are_the_mean_and_95_percent_interval_over_seeds(swept):
    summary = sweep.summarize_seeds(swept["rows"])
    assert len(summary) == 4 and all(r["seeds"] == 2 for r in summary)
    for agg in summary:
        vals = np.array([r["mse_5"] for r in swept["rows"] if (r["alpha"], r["beta"], r["k"]) ==
                         (agg["alpha"], agg["beta"], agg["k"])], np.float64)
        assert agg["mse_5"] == pytest.approx(vals.mean())
        assert agg["mse_5_ci95"] == pytest.approx(1.96 * abs(vals[0] - vals[1]) / 2)  # sd of two is |a-b|/sqrt(2)


def _row(alpha, seed, curve, *, train_at=None, eval_at=None):
    return {"alpha": alpha, "beta": 0.1, "k": 1, "seed": seed, "mse_curve": curve,
            "train_diverged": train_at is not None, "diverged_at_step": train_at,
            "eval_diverged": eval_at is not None, "eval_diverged_step": eval_at}


def test_the_heatmap_shows_finite_values_and_names_each_cells_divergence_cause():
    nan = float("nan")
    rows = [_row(0.01, 0, [1.0, 0.5, 0.4]), _row(0.01, 1, [1.0, 0.7, 0.6]),
            _row(0.1, 0, [1.0, 0.3, 2e5], eval_at=2), _row(0.1, 1, [1.0, 0.5, nan], eval_at=2),
            _row(1.0, 0, [1.0, 0.9, 0.9], train_at=4), _row(1.0, 1, [nan, nan, nan], train_at=7)]
    at, value, causes = sweep.heatmap_cells(rows, 1)
    assert at == 1
    np.testing.assert_allclose(value, [[0.6, 0.4, 0.9]])  # the finite values at step 1, whatever came later
    assert causes.tolist() == [["", "× eval@2", "× train@4"]]
    at, value, _ = sweep.heatmap_cells(rows, 1, step=2)
    np.testing.assert_allclose(value, [[0.5, 2e5, 0.9]])


def test_a_python_sweep_writes_the_clis_files(tmp_path):
    """sweep_learner(run_dir=...) writes what `jmaml sweep` writes: sweep.csv with the same header, the
    seed summary, Markdown, JSON and heatmaps."""
    import optax

    from jmaml import learners, make_loss, tasks
    from jmaml.core import models

    model = models.mlp([1, 8, 1])
    grid = sweep.Grid(alphas=(0.01, 0.05), betas=(1e-3,), ks=(1,), seeds=(0, 1))
    result = sweep.sweep_learner(lambda k: learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01,
                                                         num_inner_steps=k),
                                 tasks.sinusoid.distribution(num_support=5, num_query=5), optax.adam, model.init,
                                 grid, steps=10, meta_batch_size=4, log_every=10, apply=model.apply, eval_tasks=10,
                                 eval_steps=10, run_dir=str(tmp_path / "py"))
    names = sorted(p.name for p in (tmp_path / "py").iterdir() if not p.name.endswith((".npz", ".jsonl"))
                   and not p.name.startswith(".") and p.name != "sweep-plan.json")
    assert names == ["plots", "sweep-summary.csv", "sweep.csv", "sweep.json", "sweep.md"]
    assert sorted(p.name for p in (tmp_path / "py" / "plots").iterdir()) == ["heatmap_k1.png"]
    assert (tmp_path / "py" / "sweep.csv").read_text().splitlines()[0] == ",".join(sweep.CSV_FIELDS)
    md = (tmp_path / "py" / "sweep.md").read_text()
    assert "mean ± 95% CI" in md and "| mse@1 |" in md.lower() and md.count("\n| 0.0") >= 4
    assert len(result["rows"]) == 4 and result["meta"]["metric"] == "mse"


def test_divergence_is_flagged_per_point():
    grid = sweep.Grid(alphas=(0.01, 10.0), betas=(1e-3,), ks=(3,), seeds=(0,))
    rows = sweep.run_sweep(BASE, grid, evaluate=False)["rows"]
    assert [r["diverged"] for r in rows] == [False, True]
    assert rows[1]["train_diverged"]


@pytest.mark.parametrize("grid, match", [
    (sweep.Grid((), (1e-3,), (1,), (0,)), "alphas must be a non-empty tuple"),
    (sweep.Grid((0.01,), (0.0,), (1,), (0,)), "beta must be > 0"),
    (sweep.Grid((float("nan"),), (1e-3,), (1,), (0,)), "alpha must be finite"),
    (sweep.Grid((-0.1,), (1e-3,), (1,), (0,)), "alpha must be >= 0"),
    (sweep.Grid((0.1,), (1e-3,), (-1,), (0,)), "k must be >= 0"),
])
def test_bad_grids(grid, match):
    with pytest.raises(ValueError, match=match):
        grid.validate()


def test_grid_too_large_even_for_chunking():
    with pytest.raises(ValueError, match="too large even for chunking"):
        sweep.run_sweep(BASE, GRID, memory_budget_bytes=1000)


def test_held_out_tasks_evaluated_in_chunks_give_the_curves_of_one_call(monkeypatch):
    # an image family's sweep evaluates its held-out tasks a protocol batch at a time (all at once they need
    # tens of GiB); chunking, padding and unpadding must not change any task's curve
    model, _ = train.build_model(BASE)
    keys = jax.random.split(jax.random.key(3), 3)
    params = jax.vmap(model.init)(keys)
    alphas = jax.numpy.asarray([0.01, 0.05, 0.1], jax.numpy.float32)
    args = dict(num_tasks=20, num_diag_tasks=4, budget_bytes=2**30)
    whole, lam = sweep._evaluate_points(BASE, model, params, alphas, **args)
    monkeypatch.setattr(sweep, "_eval_task_chunk", lambda config, n: 7)  # 7 + 7 + 6 (padded to 7)
    parts, lam_parts = sweep._evaluate_points(BASE, model, params, alphas, **args)
    assert whole.shape == parts.shape == (3, 20, sweep.MAX_EVAL_STEPS + 1)
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(lam_parts, lam)


def test_the_held_out_chunk_is_the_familys_evaluation_batch():
    assert sweep._eval_task_chunk(BASE, 600) == 600  # the sinusoid's protocol: all tasks in one call
    omniglot = dataclasses.replace(BASE, task="omniglot", hidden=())
    assert sweep._eval_task_chunk(omniglot, 600) == 50 and sweep._eval_task_chunk(omniglot, 30) == 30
