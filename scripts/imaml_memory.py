"""iMAML's memory does not grow with the inner steps k; MAML's does.

Compiles one meta-gradient (the sinusoid network, 25 tasks of 10 + 10 points) for iMAML and for
second-order MAML at k = 10 and k = 1000 and reports XLA's own accounting of the compiled program
(``memory_analysis()``: temporary buffers, i.e. the peak working memory beyond inputs and outputs).
On a GPU it also runs each program once and reports the device's peak bytes in use.
Writes scripts/bench/results/imaml_memory.{json,md} (``--out`` to change):

    .venv/bin/python scripts/imaml_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jmaml import Batch, Task, make_loss  # noqa: E402
from jmaml.core import estimators, models

MIB = 2.0 ** 20


def measure(name: str, k: int, tasks: Task, params, loss) -> dict:
    if name == "imaml":
        est = estimators.imaml(loss, num_inner_steps=k, lam=1.0, cg_iters=5)
    else:
        est = estimators.maml(loss, num_inner_steps=k)
    fn = jax.jit(lambda p: est(p, tasks, inner_lr=0.01)[1])
    compiled = fn.lower(params).compile()
    mem = compiled.memory_analysis()
    row = {"algo": name, "k": k, "temp_mib": None if mem is None else mem.temp_size_in_bytes / MIB}
    device = jax.devices()[0]
    if device.platform == "gpu" and hasattr(device, "memory_stats"):
        before = (device.memory_stats() or {}).get("peak_bytes_in_use", 0)
        jax.block_until_ready(compiled(params))
        row["device_peak_mib"] = (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / MIB
        row["device_peak_before_mib"] = before / MIB
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "results")
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--ks", default="10,1000")
    args = parser.parse_args(argv)
    model = models.mlp([1, 40, 40, 1], "relu")
    loss = make_loss(model.apply, "mse")
    params = model.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (25, 10, 1), minval=-5, maxval=5)
    tasks = Task(Batch(x, jnp.sin(x)), Batch(x + 0.1, jnp.sin(x + 0.1)))
    ks = [int(v) for v in args.ks.split(",")]
    rows = [measure(name, k, tasks, params, loss) for name in ("imaml", "maml") for k in ks]
    device = f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}), JAX {jax.__version__}"
    lines = [f"# iMAML vs MAML: memory of one meta-gradient against inner steps k\n\nDevice: {device}. "
             "Sinusoid MLP 1-40-40-1, 25 tasks x (10 support + 10 query); XLA's temporary-buffer size of the "
             "compiled meta-gradient (the working memory beyond inputs and outputs).\n",
             "| algorithm | k | XLA temp (MiB) |" + (" device peak (MiB) |" if "device_peak_mib" in rows[0] else ""),
             "| --- | --- | --- |" + (" --- |" if "device_peak_mib" in rows[0] else "")]
    for r in rows:
        temp = "n/a" if r["temp_mib"] is None else f"{r['temp_mib']:.3f}"
        peak = f" {r['device_peak_mib']:.1f} |" if "device_peak_mib" in r else ""
        lines.append(f"| {r['algo']} | {r['k']} | {temp} |{peak}")
    by = {(r["algo"], r["k"]): r["temp_mib"] for r in rows}
    if None not in by.values() and len(ks) == 2:
        lines.append(f"\nk = {ks[1]} / k = {ks[0]}: iMAML {by[('imaml', ks[1])] / by[('imaml', ks[0])]:.2f}x, "
                     f"MAML {by[('maml', ks[1])] / by[('maml', ks[0])]:.1f}x.")
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    suffix = "" if jax.devices()[0].platform == "cpu" else "_" + jax.devices()[0].platform
    with open(os.path.join(args.out, f"imaml_memory{suffix}.json"), "w", encoding="utf-8") as f:
        json.dump({"device": device, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, f"imaml_memory{suffix}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
