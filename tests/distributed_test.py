"""Scale-out: the task axis sharded over 4 (forced host) devices, and 2 processes over gloo on
127.0.0.1, against the single-device run; bad configurations; a process that dies.

Every multi-device or multi-process case runs in subprocesses (XLA's device count is fixed when
JAX starts), with free ports, a time limit, and all processes killed on the way out.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from procs import ROOT, clean_env

from jmaml.engine import checkpoint

TRAIN = ["--hidden", "8", "--meta-batch-size", "4", "--shots", "5", "--query-shots", "5", "--no-pretrain",
         "--no-eval", "--log-every", "10"]
# float32 sums over tasks in a different order (per device, then across devices): equal to ~1e-6
RTOL, ATOL = 1e-4, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _processes(commands, env):
    procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for c in commands]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()  # reaps it and closes its pipes


def _wait(procs, timeout):
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {p.args} did not finish within {timeout} s")
        out.append((p.returncode, stdout, stderr))
    return out


def _state(run_dir):
    """Every leaf of the checkpointed state: parameters, Adam's moments, step and key."""
    return checkpoint.arrays(os.path.join(run_dir, "maml.ckpt.npz"))


def _jmaml(*args):
    return [sys.executable, "-m", "jmaml", "train", *TRAIN, *args]


def test_sharded_over_four_devices_equals_one_device():
    script = textwrap.dedent(f"""
        import dataclasses, io, jax, numpy as np, tempfile
        from jmaml.engine import distributed
        from jmaml.run import train
        assert jax.device_count() == 4, jax.devices()
        cfg = train.TrainConfig(hidden=(8,), meta_batch_size=8, num_support=5, num_query=5, steps=30,
                                log_every=10, checkpoint_every=30, pretrain=False)
        mesh = distributed.task_mesh()
        one = train.train(cfg, tempfile.mkdtemp(), stream=io.StringIO())["maml"]
        four = train.train(cfg, tempfile.mkdtemp(), stream=io.StringIO(), mesh=mesh)["maml"]
        assert len(four.params[0]["w"].sharding.device_set) == 4  # the state lives on all four, replicated
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol={RTOL}, atol={ATOL})
        # another estimator through the same sharded step: iMAML (vmapped CG per task) and Meta-SGD
        for algo in ("imaml", "metasgd"):
            c = dataclasses.replace(cfg, algo=algo, steps=20, checkpoint_every=20, num_inner_steps=2)
            a = train.train(c, tempfile.mkdtemp(), stream=io.StringIO())["maml"]
            b = train.train(c, tempfile.mkdtemp(), stream=io.StringIO(), mesh=mesh)["maml"]
            for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol={RTOL}, atol={ATOL})
        chunk = jax.jit(lambda s: train.make_chunk(cfg, "maml", mesh)(s, 2))
        text = chunk.lower(distributed.put_replicated(train.initial_state(cfg), mesh)).compile().as_text()
        assert "all-reduce" in text, "no cross-device reduction: the tasks were not sharded"
        try:
            train.train(dataclasses.replace(cfg, meta_batch_size=6), tempfile.mkdtemp(), mesh=mesh)
        except ValueError as e:
            assert "meta_batch_size = 6 is not divisible by the 4 devices" in str(e), e
        else:
            raise AssertionError("no error for 6 tasks over 4 devices")
        # sweeps: the grid axis or the task axis over the four devices, against no mesh
        from jmaml.run import sweep
        base = dataclasses.replace(cfg, steps=20, checkpoint_every=20)
        grid = sweep.Grid(alphas=(0.01, 0.02), betas=(1e-3, 3e-3), ks=(1,), seeds=(0,))
        ref = sweep.run_sweep(base, grid, evaluate=False, keep_params=True)["params"]
        for shard in ("grid", "tasks"):
            got = sweep.run_sweep(base, grid, evaluate=False, keep_params=True, mesh=mesh, shard=shard)["params"]
            for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
                np.testing.assert_allclose(a, b, rtol={RTOL}, atol={ATOL})
        print("ok")
    """)
    env = clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_blocks_are_taken_within_each_devices_shard():
    """blocked(learner, b, mesh): each device walks its own shard in blocks of b (float64, against the
    whole batch on one device); fit with a mesh and a block, and 'auto' choosing per device."""
    script = textwrap.dedent("""
        import io, jax, jax.numpy as jnp, numpy as np, optax
        jax.config.update("jax_enable_x64", True)
        import jmaml
        from jmaml import learners, make_loss
        from jmaml.engine import blocking
        from jmaml.engine import distributed
        from jmaml.core import models
        mesh = distributed.task_mesh()
        model = models.mlp([1, 8, 1])
        learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.05, num_inner_steps=2)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(0)))
        dist = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5)
        tasks = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), dist.sample(jax.random.key(1), 24))
        whole = jax.jit(learner.estimate)(params, tasks)
        sharded = jax.device_put(tasks, distributed.task_sharding(mesh))
        for size in (1, 2, 3, 6):  # shards of 6 tasks (6: the whole shard)
            est = jax.jit(blocking.blocked(learner, size, mesh).estimate)
            got = est(params, sharded)
            np.testing.assert_allclose(got[0], whole[0], rtol=1e-13)
            for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(whole[1])):
                np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
            np.testing.assert_allclose(got[2]["task_losses"], whole[2]["task_losses"], rtol=1e-13)  # same order
            text = est.lower(params, sharded).compile().as_text()
            assert "all-to-all" not in text and "collective-permute" not in text, "tasks moved between devices"
        try:
            blocking.blocked(learner, 4, mesh).estimate(params, tasks)
        except ValueError as e:
            assert "meta_batch_block=4 must divide the meta-batch of 6 tasks" in str(e), e
        else:
            raise AssertionError("no error for blocks of 4 in shards of 6")
        opt = optax.adam(1e-3)
        runs = [jmaml.fit(learner, dist, opt, params, steps=4, meta_batch_size=24, mesh=mesh, meta_batch_block=b,
                          log=jmaml.Logging(every=2, progress=False, stream=io.StringIO())) for b in (None, 2)]
        for a, b in zip(jax.tree.leaves(runs[0].params), jax.tree.leaves(runs[1].params)):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
        err = io.StringIO()
        jmaml.fit(learner, dist, opt, params, steps=2, meta_batch_size=24, mesh=mesh, meta_batch_block="auto",
                  log=jmaml.Logging(every=2, progress=False, stream=err))
        assert "tasks per block per device" in err.getvalue(), err.getvalue()
        # a population whose tasks are sharded: its blocks too are within each device's shard
        pops = [jmaml.fit_population(learner, dist, opt, params, {"inner_lr": [0.02, 0.05]}, steps=2,
                                     meta_batch_size=24, mesh=m, shard="tasks", meta_batch_block=b,
                                     log=jmaml.Logging(every=2, progress=False, stream=io.StringIO()))
                for m, b in ((None, None), (mesh, 3))]
        for a, b in zip(jax.tree.leaves(pops[0].points.params), jax.tree.leaves(pops[1].points.params)):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
        print("ok")
    """)
    env = clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_two_processes_over_gloo_equal_one_process(tmp_path):
    port = _free_port()
    common = ["--steps", "20", "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
              "--dist-timeout", "30"]
    with _processes([_jmaml(*common, "--process-id", str(i), "--out", str(tmp_path / "two")) for i in (0, 1)]
                    + [_jmaml("--steps", "20", "--out", str(tmp_path / "one"))], clean_env()) as procs:
        results = _wait(procs, timeout=240)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert "on 2 devices" in results[0][2] and results[1][2].strip() == ""  # process 1 writes nothing
    one, two = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert one.keys() == two.keys() and one
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=RTOL, atol=ATOL)
    assert checkpoint.read_header(tmp_path / "two" / "maml.ckpt.npz")["step"] == 20


def test_a_process_that_dies_makes_the_other_fail_instead_of_hanging(tmp_path):
    port = _free_port()
    common = ["--steps", "10000000", "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
              "2", "--dist-timeout", "10", "--out", str(tmp_path / "run")]
    with _processes([_jmaml(*common, "--process-id", str(i)) for i in (0, 1)], clean_env()) as procs:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert time.monotonic() < deadline, "training never started"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.5)
        os.killpg(procs[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        code, _, err = _wait(procs[:1], timeout=90)[0]
        waited = time.monotonic() - t0
    assert code == 4, err[-3000:]
    # Either the gloo collective fails first (our message from the worker), or JAX's coordination service
    # aborts the worker (SIGABRT, a C++ trace) and the supervising parent says so: the last word is ours.
    last = err.strip().splitlines()[-1]
    assert "distributed run failed" in last and "another process probably died" in last, err[-3000:]
    print(f"process 0 stopped {waited:.1f} s after process 1 was killed; its last line: {last}")


def test_the_supervisor_names_an_aborted_worker(monkeypatch, capsys):
    from jmaml import cli

    real = subprocess.Popen
    seen = {}

    def popen(args, env):  # the worker command and its marker, then a worker that joined the job (it says so
        # in the file the supervisor named) and aborts later, as JAX's runtime does when a peer dies
        seen.update(args=args, worker=env.get("JMAML_DISTRIBUTED_WORKER"))
        joined = env["JMAML_DISTRIBUTED_JOINED_FILE"]
        return real([sys.executable, "-c", f"import os; open({joined!r}, 'w').close(); os.abort()"])

    monkeypatch.setattr(cli.subprocess, "Popen", popen)
    argv = ["train", "--distributed", "--num-processes", "2", "--process-id", "1", "--coordinator", "h:1"]
    assert cli.main(argv) == 4
    assert seen == {"args": [sys.executable, "-m", "jmaml", *argv], "worker": "1"}
    err = capsys.readouterr().err
    assert "distributed run failed" in err and "SIGABRT" in err and "another process probably died" in err


def test_the_supervisor_starts_no_jax_backend():
    # on a GPU a backend in the parent would hold the memory its worker needs: with an unknown
    # platform any backend start fails, and the supervisor (its worker replaced by `exit 0`) still runs
    code = textwrap.dedent("""
        import subprocess, sys
        from jmaml import cli
        real = subprocess.Popen
        cli.subprocess.Popen = lambda args, env: real([sys.executable, "-c", "pass"])
        sys.exit(cli.main(["train", "--distributed", "--num-processes", "2", "--process-id", "0"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env(JAX_PLATFORMS="no_such_platform"), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, text=True,
                           env=clean_env(JAX_PLATFORMS="no_such_platform"), cwd=ROOT, timeout=120)
    assert probe.returncode != 0  # the probe: starting a backend there does fail


def test_sigterm_to_a_distributed_process_group_checkpoints_once_and_exits(tmp_path):
    # the signal reaches the worker twice (the process group, and forwarded by the supervisor): one request
    port = _free_port()
    run = tmp_path / "run"
    cmd = _jmaml("--steps", "10000000", "--distributed", "--coordinator", f"127.0.0.1:{port}",
                 "--num-processes", "1", "--process-id", "0", "--dist-timeout", "20", "--out", str(run))
    with _processes([cmd], clean_env()) as procs:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert time.monotonic() < deadline, "training never started"
            assert procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.5)
        os.killpg(procs[0].pid, signal.SIGTERM)
        code, _, err = _wait(procs, timeout=90)[0]
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM" in err and "--resume" in err
    assert checkpoint.read_header(run / "maml.ckpt.npz")["step"] > 0


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout(tmp_path):
    port = _free_port()  # nobody listens there
    t0 = time.monotonic()
    proc = subprocess.run(_jmaml("--steps", "10", "--distributed", "--coordinator", f"127.0.0.1:{port}",
                                 "--num-processes", "2", "--process-id", "1", "--dist-timeout", "3",
                                 "--out", str(tmp_path / "x")),
                          env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"could not join the distributed job at 127.0.0.1:{port}" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 90


def test_inconsistent_process_counts_fail_on_both_processes(tmp_path):
    port = _free_port()
    base = ["--steps", "10", "--distributed", "--coordinator", f"127.0.0.1:{port}", "--dist-timeout", "5",
            "--out", str(tmp_path / "x")]
    with _processes([_jmaml(*base, "--num-processes", "2", "--process-id", "0"),
                     _jmaml(*base, "--num-processes", "3", "--process-id", "1")], clean_env()) as procs:
        results = _wait(procs, timeout=120)
    assert all(code != 0 for code, _, _ in results), results
    assert "started for 3 processes but the job has 2" in results[1][2] or \
        "could not join" in results[1][2], results[1][2][-2000:]


def test_bad_distributed_flags_are_clear_errors(tmp_path, capsys):
    from jmaml import cli
    from jmaml.engine import distributed

    assert cli.main(["train", "--process-id", "1", "--out", str(tmp_path / "a")]) == 2
    assert "need --distributed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="out of range for 2 processes"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match="num_devices must be an int in"):
        distributed.task_mesh(99)


def test_a_process_whose_peers_never_joined_says_so(tmp_path):
    port = _free_port()
    proc = subprocess.run(_jmaml("--steps", "10", "--distributed", "--coordinator", f"127.0.0.1:{port}",
                                 "--num-processes", "2", "--process-id", "0", "--dist-timeout", "3",
                                 "--out", str(tmp_path / "x")),
                          env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 4 and "the other processes of the job never joined" in last, proc.stderr[-2000:]
    assert "probably died" not in last
