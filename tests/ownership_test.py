"""A run belongs to the engine: ``jmaml.fit(..., run=...)`` itself refuses a finished run, a resume
with other settings, a second writer and foreign files -- the guarantees the CLI gives, from Python."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import jmaml
from jmaml import learners, make_loss
from jmaml.core import models
from jmaml.engine import checkpoint, runstore
from jmaml.engine.fingerprint import describe, differences, digest

MODEL = models.mlp([1, 8, 1])
LOSS = make_loss(MODEL.apply, "mse")


def _fit(run_dir, *, inner_lr=0.01, k=1, meta_batch_size=4, meta_lr=1e-3, steps=20, **kw):
    learner = learners.maml(LOSS, inner_lr=inner_lr, num_inner_steps=k)
    run = jmaml.RunDir(str(run_dir), **kw)  # resume, overwrite, allow_changed, fingerprint
    return jmaml.fit(learner, jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5), optax.adam(meta_lr),
                     MODEL.init(jax.random.key(0)), steps=steps, meta_batch_size=meta_batch_size, key=1, run=run,
                     log=jmaml.Logging(every=10, progress=False))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 20-step run, copied afresh for each test that changes it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    state = _fit(run)
    return run, state


def _copy(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    return run


def _steps(run):
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line)["step"] for line in f]


def test_a_finished_run_is_refused_without_resume_and_left_untouched(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = {n: (run / n).read_bytes() for n in ("maml.ckpt.npz", "metrics.jsonl")}
    with pytest.raises(ValueError, match=r"already holds a finished run 'maml' \(20 steps\).*resume=True.*"
                                         r"overwrite=True"):
        _fit(run, steps=10)
    assert {n: (run / n).read_bytes() for n in before} == before  # nothing replaced, nothing appended
    # resume=True returns the finished run as it is; a shorter one is refused by name
    state = _fit(run, resume=True)
    for a, b in zip(checkpoint.host_leaves(state), checkpoint.host_leaves(finished[1])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="a run cannot be shortened"):
        _fit(run, resume=True, steps=10)


@pytest.mark.parametrize("change, named", [
    ({"inner_lr": 0.5}, "learner_fns"),
    ({"meta_batch_size": 8}, "meta_batch_size"),
    ({"meta_lr": 1e-2}, "optimiser"),
    ({"k": 5}, "learner_fns"),
])
def test_a_resume_with_other_settings_is_refused_naming_what_changed(finished, tmp_path, change, named):
    run = _copy(finished, tmp_path)
    with pytest.raises(ValueError, match=rf"trained with other settings \({named} changed: .*allow_changed=True"):
        _fit(run, resume=True, steps=30, **change)
    assert checkpoint.read_header(run / "maml.ckpt.npz")["step"] == 20 and _steps(run) == [10, 20]


def test_the_refusal_names_the_value_that_changed(finished, tmp_path):
    run = _copy(finished, tmp_path)
    with pytest.raises(ValueError, match=r"default_k: 1 -> 5") as e:
        _fit(run, resume=True, steps=30, k=5)
    assert "step_size: -0.001" not in str(e.value)  # only what changed is named
    with pytest.raises(ValueError, match=r"step_size: -0.001 -> -0.01"):
        _fit(run, resume=True, steps=30, meta_lr=1e-2)


def test_allow_changed_continues_on_purpose_and_is_recorded(finished, tmp_path):
    run = _copy(finished, tmp_path)
    # a named exception lets only that setting change
    with pytest.raises(ValueError, match="optimiser changed"):
        _fit(run, resume=True, steps=30, meta_lr=1e-2, inner_lr=0.02, allow_changed=["learner_fns"])
    state = _fit(run, resume=True, steps=30, meta_lr=1e-2, allow_changed=["optimiser"])
    assert int(state.step) == 30 and _steps(run) == [10, 20, 30]
    history = checkpoint.read_header(run / "maml.ckpt.npz")["extra"]["fit"]["history"]
    assert [h["event"] for h in history] == ["changed settings"]
    assert history[0]["changed"] == ["optimiser"] and history[0]["at_step"] == 20
    # the checkpoint now carries the new settings: resuming with them again needs no permission
    _fit(run, resume=True, steps=40, meta_lr=1e-2)
    assert _steps(run) == [10, 20, 30, 40]


def test_overwrite_replaces_only_the_runs_own_files_and_is_recorded(finished, tmp_path):
    run = _copy(finished, tmp_path)
    (run / "notes.txt").write_text("mine")
    with open(run / "metrics.jsonl", "a") as f:  # another run's lines in the same file stay
        f.write(json.dumps({"phase": "other", "step": 5}) + "\n")
    state = _fit(run, overwrite=True, steps=10, inner_lr=0.02)
    assert int(state.step) == 10 and (run / "notes.txt").read_text() == "mine"
    with open(run / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [(r["phase"], r["step"]) for r in lines] == [("other", 5), ("maml", 10)]
    history = checkpoint.read_header(run / "maml.ckpt.npz")["extra"]["fit"]["history"]
    assert history[0]["event"] == "overwrite" and history[0]["previous_step"] == 20
    with pytest.raises(ValueError, match="contradict"):
        _fit(run, overwrite=True, resume=True)


def test_files_that_are_not_a_jmaml_runs_are_never_replaced(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "maml.ckpt.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="does not replace a file it cannot read"):
        _fit(run, overwrite=True)
    assert (run / "maml.ckpt.npz").read_bytes() == b"not a checkpoint"
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("time,loss\n1,2\n3,4\n")
    with pytest.raises(ValueError, match="metrics.jsonl that is not a jmaml run's"):
        _fit(other)
    assert (other / "metrics.jsonl").read_text() == "time,loss\n1,2\n3,4\n"
    with pytest.raises(ValueError, match="no checkpoint .* to resume from"):
        _fit(tmp_path / "empty", resume=True)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    # another process holding the run dir
    code = textwrap.dedent(f"""
        import sys, time
        from jmaml.engine import runstore
        with runstore.lock({str(run)!r}):
            print("locked", flush=True)
            sys.stdin.read()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another jmaml process \(pid {holder.pid}\)"):
            _fit(run)
    finally:
        holder.communicate("")
    assert not (run / "maml.ckpt.npz").exists()
    # a second fit in this very process (a lock not lent to it) is refused too
    with runstore.lock(str(run)):
        with pytest.raises(ValueError, match="in use by another jmaml process"):
            _fit(run)
    _fit(run)  # released: the run goes ahead


def test_a_users_own_fingerprint_is_recorded_and_checked(tmp_path):
    run = tmp_path / "run"
    _fit(run, fingerprint={"data_version": 1}, steps=10)
    with pytest.raises(ValueError, match=r"settings.data_version changed"):
        _fit(run, fingerprint={"data_version": 2}, resume=True)
    _fit(run, fingerprint={"data_version": 2}, resume=True, allow_changed=["settings.data_version"])
    assert checkpoint.read_header(run / "maml.ckpt.npz")["step"] == 20
    with pytest.raises(TypeError, match="fingerprint must be a dict"):
        _fit(tmp_path / "b", fingerprint="v1")


def test_a_run_stopped_before_its_first_checkpoint_is_not_silently_appended_to(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"phase": "maml", "step": 10}) + "\n")
    with pytest.raises(ValueError, match="no checkpoint .*overwrite=True"):
        _fit(run)
    _fit(run, overwrite=True)
    assert _steps(run) == [10, 20]


def test_describe_sees_a_factorys_settings_and_never_a_memory_address():
    a, b = optax.adam(1e-3), optax.adam(1e-3)
    assert digest(describe(a)) == digest(describe(b))  # same settings, other objects
    assert differences(describe(a), describe(optax.adam(1e-3, b1=0.8)))  # b1 shows
    text = json.dumps(describe({"f": lambda x: x, "o": object(), "arr": np.arange(100.0)}))
    assert "0x" not in text and "digest" in text
    # a cycle and deep nesting terminate
    cyc: list = []
    cyc.append(cyc)
    assert "<cycle>" in json.dumps(describe(cyc))


def test_the_fingerprint_is_the_same_in_a_new_process(tmp_path):
    """A run stopped in one process resumes in another (the fingerprint holds no ids or addresses)."""
    script = textwrap.dedent("""
        import sys, jax, optax, jmaml
        from jmaml import learners, make_loss
        from jmaml.core import models
        model = models.mlp([1, 8, 1])
        learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
        resume = sys.argv[2] == "resume"
        try:
            state = jmaml.fit(learner, jmaml.tasks.sinusoid.distribution(), optax.adam(1e-3),
                              model.init(jax.random.key(0)), steps=20, meta_batch_size=4, key=1,
                              run=jmaml.RunDir(sys.argv[1], resume=resume), log=jmaml.Logging(every=10, progress=False),
                              stop_at_step=None if resume else 10)
            print("finished", int(state.step))
        except jmaml.Interrupted:
            print("stopped")
    """)
    path = tmp_path / "user.py"
    path.write_text(script)
    run = str(tmp_path / "run")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = [subprocess.run([sys.executable, str(path), run, mode], capture_output=True, text=True, env=env, check=True)
           .stdout.strip() for mode in ("new", "resume")]
    assert out == ["stopped", "finished 20"]
