"""Meta-RL sweeps: ``jmaml.rl.recipe.sweep`` (a population of whole MAML-RL runs per k, scored by the paper's
protocol at each point's own rate) and ``jmaml sweep --task navigation2d`` (jmaml rl's settings, one resume
rule: SIGKILL, then ``--resume`` alone finishes it bitwise)."""

import contextlib
import io
import json
import signal

import jax
import numpy as np
import optax
import procs
import pytest

import jmaml
from jmaml import cli, rl
from jmaml.engine import checkpoint
from jmaml.run import rl_recipe as recipe
from jmaml.run.sweep import Grid

TINY = dict(horizon=5, meta_batch_size=2, inner_episodes=2, outer_episodes=2, hidden=(8,), log_every=1, eval_tasks=3,
            eval_episodes=2, validation_tasks=2, pretrain=False)


def test_a_sweep_point_is_the_run_jmaml_rl_trains(tmp_path):
    """A point of the sweep (its α, seed 0, the tasks of seed 0) is MAML as ``recipe.train`` trains it alone --
    the same policy after the same meta-steps -- and the sweep writes the CLI's files, the return its metric."""
    config = recipe.RLConfig(**TINY, steps=3, outer="adam", inner_lr=0.1)
    result = recipe.sweep(config, Grid((0.1, 0.3), (0.01,), (1,), (0, 1)), str(tmp_path / "sweep"),
                          stream=io.StringIO())
    alone = recipe.train(config, None, progress=False, stream=io.StringIO())["maml"]
    point = [i for i, r in enumerate(result["rows"]) if r["alpha"] == 0.1 and r["seed"] == 0]
    assert len(point) == 1
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(result["params"][point[0]])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert result["meta"]["metric"] == "return" and result["meta"]["higher_is_better"]
    assert not result["meta"]["beta_ignored"]  # Adam's meta rate is swept
    rows = result["rows"]
    assert len(rows) == 4 and all(len(r["mse_curve"]) == config.eval_steps + 1 for r in rows)
    assert all(np.isfinite(r["mse_curve"]).all() and not r["diverged"] for r in rows)
    for name in ("sweep.csv", "sweep-summary.csv", "sweep.md", "sweep.json", "sweep-plan.json"):
        assert (tmp_path / "sweep" / name).exists(), name
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "return@1 | return@2 | return@3" in md and "return@5" not in md


def test_a_population_is_scored_at_each_points_own_schedule():
    """``evaluate_population`` takes a schedule per point (the paper's α, α/2): [α, α] is the constant α
    exactly; [α, α/2] agrees with it after one step and not after two; a ragged schedule is refused."""
    env, policy = rl.envs.navigation2d(horizon=5), rl.policies.gaussian_mlp(2, 2, hidden=(8,))
    learner = rl.maml_rl(env, policy, inner_lr=0.1, inner_episodes=2, outer_episodes=2)
    dist = rl.task_distribution(env)
    pop = jmaml.fit_population(learner, dist, optax.adam, policy.init, {"seed": [0, 1], "meta_lr": [1e-2, 1e-2]},
                               steps=1, meta_batch_size=2,
                               log=jmaml.Logging(every=1, progress=False, stream=io.StringIO()))
    metric = rl.return_metric(env, policy, 2)

    def curves(rates):
        out = jmaml.evaluate_population(learner, pop, dist, {"inner_lr": rates}, metric=metric, num_tasks=3,
                                        num_steps=2, progress=False)
        return np.asarray([r["all"]["mean"] for r in out])

    constant = curves([0.05, 0.1])
    np.testing.assert_array_equal(curves([[0.05, 0.05], [0.1, 0.1]]), constant)
    halved = curves([[0.05, 0.025], [0.1, 0.05]])
    np.testing.assert_array_equal(halved[:, :2], constant[:, :2])
    assert (halved[:, 2] != constant[:, 2]).all()
    with pytest.raises(ValueError, match=r"points\['inner_lr'\]: each point's schedule must hold the same number"):
        curves([[0.05, 0.025], [0.1]])


def test_a_trpo_sweep_takes_one_beta_which_it_ignores():
    config = recipe.RLConfig(**TINY, steps=1)
    with pytest.raises(ValueError, match=r"beta \[0.001, 0.01\]: learner 'maml_rl_trpo' returns its update itself"):
        recipe.sweep(config, Grid((0.1,), (0.001, 0.01), (1,), (0,)), stream=io.StringIO())
    result = recipe.sweep(config, Grid((0.1,), (0.5,), (1,), (0,)), stream=io.StringIO())
    assert result["rows"][0]["beta"] == 0.5 and np.isfinite(result["rows"][0]["mse_curve"]).all()
    assert result["meta"]["beta_ignored"]


SWEEP = ["sweep", "--task", "navigation2d", "--alpha", "0.1,0.2", "--steps", "30", "--log-every", "1",
         "--meta-batch-size", "2", "--episodes", "2", "--horizon", "5", "--hidden", "8", "--eval-tasks", "3",
         "--eval-episodes", "2"]


def _main(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(argv))
    return code, err.getvalue()


def test_an_rl_sweep_refuses_what_is_not_its_setting(tmp_path):
    code, err = _main(*SWEEP, "--shots", "5", "--out", str(tmp_path / "a"))
    assert code == 2 and "--shots: not a setting of a meta-RL sweep" in err, err
    code, err = _main(*SWEEP, "--algo", "reptile", "--out", str(tmp_path / "a"))
    assert code == 2 and "--algo reptile: not a setting of a meta-RL sweep" in err, err
    code, err = _main("sweep", "--horizon", "5", "--steps", "2", "--out", str(tmp_path / "b"))
    from jmaml.run.rl_recipe import RL_ENVS

    assert code == 2 and f"--horizon: meta-RL settings (--task {', '.join(RL_ENVS)})" in err, err
    code, err = _main(*SWEEP, "--outer", "trpo", "--beta", "0.01,0.1", "--out", str(tmp_path / "c"))
    assert code == 2 and "returns its update itself" in err, err


@pytest.mark.slow
def test_an_rl_sweep_killed_by_sigkill_resumes_bitwise_from_resume_alone(tmp_path):
    """``jmaml sweep --task navigation2d`` (MAML-TRPO, jmaml rl's default outer step) killed mid-population,
    then ``--resume`` with no other flag: the sweep recorded, finished, bitwise the uninterrupted one; a
    contradicting flag refused by name."""
    done = procs.run([*procs.JMAML, *SWEEP, "--out", str(tmp_path / "straight")])
    assert done.returncode == 0, done.stderr[-2000:]
    killed = tmp_path / "killed"
    ckpt = killed / "sweep-k1.ckpt.npz"
    code = procs.kill_at_checkpoint([*procs.JMAML, *SWEEP, "--out", str(killed)], ckpt, before_step=30)
    assert code == -signal.SIGKILL, "the sweep finished before it could be killed"
    refused = procs.run([*procs.JMAML, "sweep", "--out", str(killed), "--resume", "--horizon", "7"])
    assert refused.returncode == 2 and "--horizon 7 (recorded 5)" in refused.stderr, refused.stderr[-2000:]
    resumed = procs.run([*procs.JMAML, "sweep", "--out", str(killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = checkpoint.arrays(tmp_path / "straight" / "sweep-k1.ckpt.npz"), checkpoint.arrays(ckpt)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows = [json.loads((tmp_path / run / "sweep.json").read_text())["rows"] for run in ("straight", "killed")]
    assert [r["mse_curve"] for r in rows[0]] == [r["mse_curve"] for r in rows[1]]
    assert checkpoint.read_header(ckpt)["step"] == 30

