"""The adversarial probe's findings: data loss and silent wrongness first -- overwrite into a stranger's
folder, forged checkpoint headers, a divergence check that NaN cannot switch off, a named one-line
error for CLI nonsense; restoring parameters without a train-state template."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmaml
from jmaml import learners, make_loss
from jmaml.core import models
from jmaml.run import evaluate


def _fit_run(run_dir, steps=20, **run):
    import optax
    model = models.mlp([1, 8, 1])
    learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
    return jmaml.fit(learner, jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5), optax.adam(1e-3),
                     model.init(jax.random.key(0)), steps=steps, meta_batch_size=4, key=1,
                     run=jmaml.RunDir(str(run_dir), checkpoint_every=10, **run),
                     log=jmaml.Logging(every=10, progress=False), name="maml")


def _rewrite_header(path, change):
    """Edits a checkpoint's header in place (the arrays' checksum does not cover it), as the probe did."""
    import json
    with np.load(path, allow_pickle=False) as data:
        payload = {k: np.array(data[k]) for k in data.files}
    header = json.loads(str(payload["header"]))
    payload["header"] = np.asarray(json.dumps(change(header)))
    with open(path, "wb") as f:
        np.savez(f, **payload)


def test_overwrite_never_writes_into_a_folder_that_is_not_a_run(tmp_path, capsys):
    from jmaml import cli
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"phase": "maml", "step": 1}\n')
    (folder / "notes.txt").write_text("my notes")
    code = cli.main(["train", "--steps", "5", "--out", str(folder), "--overwrite"])
    assert code != 0 and "holds no jmaml run" in capsys.readouterr().err
    assert sorted(set(os.listdir(folder)) - {".jmaml.lock"}) == ["metrics.jsonl", "notes.txt"]  # the lock is empty
    assert (folder / "metrics.jsonl").read_text() == '{"phase": "maml", "step": 1}\n'


def test_fit_overwrite_refuses_another_runs_or_a_strangers_checkpoint(tmp_path):
    from jmaml.engine import checkpoint
    _fit_run(tmp_path / "a")
    os.rename(tmp_path / "a" / "maml.ckpt.npz", tmp_path / "a" / "other.ckpt.npz")
    import shutil
    shutil.copy(tmp_path / "a" / "other.ckpt.npz", tmp_path / "a" / "maml.ckpt.npz")
    _rewrite_header(str(tmp_path / "a" / "maml.ckpt.npz"), lambda h: {**h, "extra": {**h["extra"], "phase": "x"}})
    before = (tmp_path / "a" / "maml.ckpt.npz").read_bytes()
    with pytest.raises(ValueError, match="is run 'x''s, not run 'maml''s; jmaml will not replace it"):
        _fit_run(tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / "maml.ckpt.npz").read_bytes() == before
    stranger = tmp_path / "b"
    stranger.mkdir()
    checkpoint.save(str(stranger / "maml.ckpt.npz"), {"w": jnp.ones(3)}, step=3)  # no run record at all
    with pytest.raises(ValueError, match="a checkpoint fit did not write"):
        _fit_run(stranger, overwrite=True)


@pytest.mark.parametrize("step", [-5, 2000, 10])
def test_a_header_step_that_is_not_the_states_is_refused_before_anything_is_trimmed(tmp_path, step):
    from jmaml.engine import checkpoint
    run = tmp_path / "run"
    _fit_run(run, steps=20)
    lines = (run / "metrics.jsonl").read_text()
    _rewrite_header(str(run / "maml.ckpt.npz"), lambda h: {**h, "step": step})
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        _fit_run(run, steps=40, resume=True)
    assert (run / "metrics.jsonl").read_text() == lines  # no metrics line deleted


@pytest.mark.parametrize("change,match", [
    (lambda h: [1, 2], "header is a JSON list"),
    (lambda h: {**h, "extra": "oops"}, "extra is a str"),
    (lambda h: {**h, "format": "jmaml-checkpoint-v1", "num_leaves": 10**9}, "names 1000000000 arrays"),
    (lambda h: {**h, "keys": "params"}, "keys are not a list"),
])
def test_forged_headers_are_named_not_tracebacks(tmp_path, change, match):
    from jmaml.engine import checkpoint
    path = str(tmp_path / "c.ckpt.npz")
    checkpoint.save(path, {"w": jnp.ones(3), "step": jnp.asarray(3)}, step=3)
    _rewrite_header(path, change)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.read_header(path)


def test_the_divergence_check_cannot_be_switched_off_by_nan_and_sees_nan_task_losses(tmp_path):
    import optax
    model = models.mlp([1, 8, 1])
    learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
    dist = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5)
    args = (learner, dist, optax.adam(1e-3), model.init(jax.random.key(0)))
    with pytest.raises(ValueError, match="max_loss_ratio must be a number > 0"):
        jmaml.fit(*args, steps=2, meta_batch_size=2, max_loss_ratio=float("nan"), log=jmaml.Logging(progress=False))

    def nan_tasks(params, tasks, meta_step=None, **hyper):  # a user's learner reporting NaN per-task losses
        loss, grads, metrics = learner.estimate(params, tasks, meta_step, **hyper)
        return loss, grads, {**metrics, "task_losses": metrics["task_losses"].at[1].set(jnp.nan)}

    with pytest.raises(jmaml.DivergenceError, match=r"non-finite .*task loss.*tasks \[1\]"):
        jmaml.fit(learner._replace(estimate=nan_tasks), *args[1:], steps=4, meta_batch_size=2,
                  log=jmaml.Logging(every=2, progress=False))


def test_eval_says_which_checkpoint_it_scored(tmp_path, capsys):
    run = tmp_path / "run"
    import io

    from jmaml.run.config import TrainConfig
    config = TrainConfig(hidden=(8,), meta_batch_size=4, steps=20, log_every=10, checkpoint_every=10, pretrain=False)
    with pytest.raises(jmaml.Interrupted):  # a run still training, or stopped
        jmaml.train.train(config, str(run), stop_at_step=10, stream=io.StringIO())
    results = evaluate.evaluate_run(str(run), num_tasks=20, write=True)
    assert results["checkpoint"] == {"step": 10, "of_steps": 20, "finished": False, "verified": True}
    assert "is at step 10 of 20" in capsys.readouterr().err
    assert "had not finished" in (run / "eval.md").read_text()
    _rewrite_header(str(run / "maml.ckpt.npz"), lambda h: {**h, "extra": {k: v for k, v in h["extra"].items()
                                                                          if k != "run"}})
    assert evaluate.evaluate_run(str(run), num_tasks=20, write=False)["checkpoint"]["verified"] is False
    assert "records no run fingerprint" in capsys.readouterr().err
    from jmaml.run import runinfo
    assert "WARNING: records no run fingerprint" in runinfo.format_inspection(runinfo.inspect_run(str(run)))
    from jmaml.run import plot
    for foreign in ('{"foo": 1}', "[1, 2]"):  # a foreign eval.json: named, not a KeyError/AttributeError
        (run / "eval.json").write_text(foreign)
        with pytest.raises(ValueError, match="is not a jmaml evaluation of this run"):
            plot.plot_run(str(run))


@pytest.mark.parametrize("argv,match", [
    (["sweep", "--seeds", "99999999999999999999999"], "--seeds must be between 1 and 1000"),
    (["sweep", "--task-seed", "99999999999999999999999"], "--task-seed must be <= 2147483647"),
    (["sweep", "--log-every", "0"], "--log-every must be >= 1"),
    (["train", "--ways", "3"], "ways applies to the image tasks"),
    (["train", "--cache-dir", "/tmp"], "cache_dir applies to the image tasks"),
    (["train", "--inner-settings", "momentum=0.9"], "without inner_optimiser"),
    (["train", "--algo", "maml", "--per-parameter-hyper"], "per_parameter_hyper=True without learn_inner_hyper"),
])
def test_cli_nonsense_is_a_named_one_line_error(tmp_path, capsys, argv, match):
    from jmaml import cli
    code = cli.main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and match in err and "Traceback" not in err
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_tasks_file_with_a_huge_integer_and_a_config_with_an_int_hidden(tmp_path, capsys):
    import json

    from jmaml import cli
    from jmaml.run.config import TrainConfig
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"tasks": [{"support": {"x": [1, int("9" * 400)], "y": [1, 2]},
                                           "query": {"x": [1], "y": [2]}}]}))
    assert cli.main(["seed", "--tasks", str(path)]) != 0
    assert "must be a finite float64 number, got an integer of 400 digits" in capsys.readouterr().err
    with pytest.raises(ValueError, match="hidden must be a list of layer widths"):
        TrainConfig.from_dict({"hidden": 40})


def test_restore_params_alone_without_a_train_state_template(tmp_path):
    from jmaml.engine import checkpoint
    state = _fit_run(tmp_path / "run")
    path = str(tmp_path / "run" / "maml.ckpt.npz")
    plain = checkpoint.restore_params(path)
    assert isinstance(plain, list) and set(plain[0]) == {"w", "b"}
    for got, want in zip(jax.tree.leaves(plain), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(got, want)
    like = models.mlp([1, 8, 1]).init(jax.random.key(5))
    into = checkpoint.restore_params(path, like)
    assert jax.tree.structure(into) == jax.tree.structure(like)
    np.testing.assert_array_equal(into[1]["w"], state.params[1]["w"])
    with pytest.raises(checkpoint.CheckpointError, match="do not match `like`"):
        checkpoint.restore_params(path, models.mlp([1, 4, 4, 1]).init(jax.random.key(0)))
    with pytest.raises(checkpoint.CheckpointError, match="holds no arrays under 'nothing'"):
        checkpoint.restore_params(path, prefix="nothing")
