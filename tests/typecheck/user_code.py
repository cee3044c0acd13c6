"""A researcher's own script, type-checked with ``mypy --strict`` against jmaml's annotations
(scripts/test.sh). Not a test module and never run: it fails the type check if a public function
a user calls loses its annotations (strict mode refuses calls to untyped functions) or changes a
signature this code relies on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import jmaml
from jmaml import Batch, MetaLearner, Model, Task, TaskDistribution, TrainState, fit, learners, make_loss, tasks
from jmaml.core import models
from jmaml.engine import checkpoint, writers
from jmaml.run import runinfo
from jmaml.run.evaluate import evaluate


def my_sample(key: jax.Array, num_tasks: int) -> Task:
    x = jax.random.uniform(key, (num_tasks, 10, 1), minval=-5.0, maxval=5.0)
    slope = jax.random.normal(key, (num_tasks, 1, 1))
    return Task(Batch(x[:, :5], slope * x[:, :5]), Batch(x[:, 5:], slope * x[:, 5:]))


def main(run_dir: str) -> float:
    model: Model = models.mlp([1, 16, 1])
    loss = make_loss(model.apply, "mse")
    learner: MetaLearner = learners.maml(loss, inner_lr=0.01, num_inner_steps=2)
    other: MetaLearner = learners.make("reptile", loss, inner_lr=0.01, num_inner_steps=2)
    dist = TaskDistribution(sample=my_sample, heldout=my_sample, name="lines")
    seen: list[float] = []
    records: list[dict[str, object]] = []
    log = jmaml.Logging(every=10, writers=[writers.CallbackWriter(lambda r: seen.append(float(r["meta_loss"]))),
                                           writers.JsonlWriter(run_dir + "/extra.jsonl"),
                                           writers.CallbackWriter(records.append)])
    state: TrainState = fit(learner, dist, optax.adam(1e-3), model.init(jax.random.key(0)), steps=20,
                            meta_batch_size=4, run=run_dir, log=log)
    adapted = jmaml.adapt(loss, state.params, my_sample(jax.random.key(1), 1).support, inner_lr=0.01,
                          num_steps=3)
    report = evaluate(other, state.params, tasks.sinusoid.distribution(), apply=model.apply, num_tasks=10,
                      num_steps=2)
    checkpoint.save(run_dir + "/mine.ckpt.npz", {"params": adapted}, step=3)
    restored, header = checkpoint.restore(run_dir + "/mine.ckpt.npz", {"params": adapted})
    info = runinfo.inspect_run(run_dir)
    print(runinfo.format_inspection(info), header["step"], restored, report)
    resnet = models.resnet12(5, widths=(4, 4, 8, 8), image_size=16)
    logits = resnet.apply(resnet.init(jax.random.key(0)), jnp.zeros((2, 16, 16, 3)))
    return float(jnp.sum(logits)) + seen[-1]
