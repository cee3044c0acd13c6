"""Metric writers: JSONL, a user callback, TensorBoard (the event file is read back with the
protobuf definitions, not through jmaml), and bad writers named clearly."""

import contextlib
import json
import struct
import time

import jax
import numpy as np
import optax
import pytest

from jmaml import Logging, fit, learners, make_loss, tasks
from jmaml.core import models
from jmaml.engine import writers


def _fit(tmp_path, run_dir=None, writers=None):
    model = models.mlp([1, 8, 1])
    learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
    return fit(learner, tasks.sinusoid.distribution(), optax.adam(1e-3), model.init(jax.random.key(0)), steps=30,
               meta_batch_size=4, run=run_dir, log=Logging(every=10, progress=False, writers=writers))


def _events(path):
    """Every Event in a TensorBoard file: TFRecord framing (length, crc, data, crc) parsed here."""
    from tensorboardX.proto import event_pb2

    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + length]))
        i += 12 + length + 4
    return out


def test_jsonl_and_callback_writers_get_every_chunk_with_speed_and_wall_time(tmp_path):
    seen = []
    _fit(tmp_path, run_dir=str(tmp_path / "run"),
         writers=[writers.JsonlWriter(tmp_path / "extra" / "m.jsonl"), writers.CallbackWriter(seen.append)])
    own = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    extra = [json.loads(line) for line in (tmp_path / "extra" / "m.jsonl").read_text().splitlines()]
    assert own == extra == seen
    assert [r["step"] for r in seen] == [10, 20, 30]
    for r in seen:
        assert r["steps_per_s"] > 0 and r["wall_time"] > 1.7e9 and np.isfinite(r["meta_loss"])
    assert seen[0]["wall_time"] <= seen[1]["wall_time"] <= seen[2]["wall_time"]


def test_each_start_says_it_is_compiling_and_records_its_time_to_the_first_chunk(tmp_path):
    import io

    import jmaml

    model = models.mlp([1, 8, 1])
    learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
    seen, stream = [], io.StringIO()

    def run(**kw):
        t0 = time.perf_counter()
        with contextlib.suppress(jmaml.Interrupted):
            fit(learner, tasks.sinusoid.distribution(), optax.adam(1e-3), model.init(jax.random.key(0)), steps=30,
                meta_batch_size=4,
                run=jmaml.RunDir(str(tmp_path / "run"), checkpoint_every=10, resume=kw.pop("resume", False)),
                log=Logging(every=10, stream=stream, writers=[writers.CallbackWriter(seen.append)]), **kw)
        return time.perf_counter() - t0

    whole = run(stop_at_step=20)
    first = [r for r in seen if "time_to_first_chunk_s" in r]
    assert [r["step"] for r in first] == [10] and 0 < first[0]["time_to_first_chunk_s"] < whole
    assert "maml: compiling a chunk of 10 meta-steps from step 0 ..." in stream.getvalue()
    run(resume=True)  # a resume is a start of its own: its first record says how long it took
    assert [r["step"] for r in seen if "time_to_first_chunk_s" in r] == [10, 30]
    assert "compiling a chunk of 10 meta-steps from step 20 ..." in stream.getvalue()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "time_to_first_chunk_s" in r] == [10, 30]


def test_tensorboard_event_file_holds_every_scalar_at_its_step(tmp_path):
    pytest.importorskip("tensorboardX")
    seen = []
    tb = writers.TensorBoardWriter(tmp_path / "tb")
    _fit(tmp_path, writers=[tb, writers.CallbackWriter(seen.append)])
    tb.close()
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    got = {}
    for event in _events(files[0]):
        for value in event.summary.value:
            got[(value.tag, event.step)] = value.simple_value
    for record in seen:
        for name in ("meta_loss", "grad_norm", "pre_adapt_loss", "steps_per_s"):
            assert got[(f"maml/{name}", record["step"])] == pytest.approx(record[name], rel=1e-6)
    assert {step for _, step in got} == {10, 20, 30}


def test_train_cli_tensorboard_flag(tmp_path):
    pytest.importorskip("tensorboardX")
    from jmaml import cli

    run = tmp_path / "run"
    code = cli.main(["train", "--out", str(run), "--steps", "20", "--log-every", "10", "--hidden", "8",
                     "--meta-batch-size", "4", "--no-eval", "--no-pretrain", "--tensorboard"])
    assert code == 0
    tags = {(v.tag, e.step) for f in (run / "tensorboard").glob("events.*") for e in _events(f)
            for v in e.summary.value}
    assert ("maml/meta_loss", 10) in tags and ("maml/meta_loss", 20) in tags


def test_a_bad_writer_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"writers\[1\].*write\(record\) and flush\(\)"):
        _fit(tmp_path, writers=[writers.JsonlWriter(tmp_path / "m.jsonl"), print])
    with pytest.raises(TypeError, match="fn must be callable"):
        writers.CallbackWriter(3)
