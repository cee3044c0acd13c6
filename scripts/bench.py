"""jmaml benchmarks, each measured side by side with its comparators in one invocation.

Sinusoid second-order MAML (MLP 1-40-40-1 ReLU, K = 10 + 10 query, alpha = 0.01, Adam 1e-3):

1. meta-steps/s for meta-batch {25, 1000} (and 100,000 on GPU) x k {1, 5}, each implementation and
   cell measured in a fresh process: jmaml (a `lax.scan`
   of jitted steps, tasks sampled on the device, inner loop rolled or fully unrolled — both
   measured, the better reported; and its opt-in variants: the fused Pallas meta-gradient,
   `backend="fused"`, and mixed precision, `precision="bf16"`) against (a) the JAX a user writes
   first (Python loop over inner steps, vmap, jit of the meta-step, optax; one dispatch per step) and
   (b) PyTorch torch.func (functional_call + grad + vmap, .backward(), torch.optim.Adam). The peers
   reuse one fixed meta-batch already on the device; jmaml samples a fresh one inside every step (its
   cost counted).
   Roofline: XLA's cost analysis of one compiled meta-step (FLOPs, bytes accessed) per cell and
   implementation, times the measured steps/s, as fractions of the device's peak FLOP/s and bytes/s
   (datasheet for known GPUs, nominal from /proc/cpuinfo for the CPU) and the ceilings measured here.
2. compile time (trace + XLA compile of one meta-step, B = 25) vs k in {1, 5, 25, 100}.
3. peak memory of one meta-step (B = 25; XLA's buffer assignment: temporaries + arguments +
   outputs) vs k in {10, 100, 1000}, with and without remat.
4. a 64-point alpha x beta grid (k = 1, B = 25) trained as one vmapped program vs the same 64 runs
   one after another (each compiling, as separate runs do).

Writes JSON and a Markdown table of ratios. Usage (from the repository root):

    .venv/bin/python scripts/bench.py                 # CPU; writes scripts/bench/results/cpu.*
    python3 scripts/bench.py --device gpu             # on a GPU machine (PYTHONPATH=.)
    .venv/bin/python scripts/bench.py --quick         # a fast smoke run (smaller measurements)

torch is optional: `pip install torch==2.13.0` (the CPU build); without it that column is empty.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.bench.roofline import ceilings, peak_rates, point, program_cost  # noqa: E402


def _device_setup(device: str) -> None:
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def machine_info(device: str) -> dict:
    import jax

    info = {"device": device, "jax": jax.__version__, "python": platform.python_version(),
            "jax_device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count()}
    from jmaml.core._util import cpu_name

    info["cpu"] = cpu_name()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device == "gpu" and torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
    return info


def _timed(run, steps_per_call: int, min_time: float, max_calls: int = 10_000) -> float:
    """Steps per second of ``run()`` (which performs ``steps_per_call`` steps), after a warm-up."""
    run()  # compile / warm up
    calls, total = 0, 0.0
    while total < min_time and calls < max_calls:
        total += run()
        calls += 1
    return steps_per_call * calls / total


VARIANTS = {  # jmaml's measured variants: TrainConfig fields beyond the cell's
    "jmaml_rolled": {"unroll": 1},
    "jmaml_unrolled": {"unroll": True},
    "jmaml_fused": {"algo_options": {"backend": "fused"}},
    "jmaml_bf16": {"precision": "bf16"},
}


def _config(meta_batch: int, k: int, impl: str, chunk_len: int = 1):
    from jmaml.run import train

    return train.TrainConfig(meta_batch_size=meta_batch, num_inner_steps=k, log_every=chunk_len,
                             checkpoint_every=chunk_len, steps=chunk_len, **VARIANTS[impl]).validate()


def bench_jmaml(meta_batch: int, k: int, impl: str, chunk_len: int, min_time: float) -> float:
    from scripts.bench import chunk_runner

    return _timed(chunk_runner(_config(meta_batch, k, impl, chunk_len), chunk_len), chunk_len, min_time)


def bench_peer_jax(meta_batch: int, k: int, calls: int, min_time: float) -> float:
    from scripts.bench.peers import common, jax_naive

    run, _, _ = jax_naive.setup(common.sample_numpy_tasks(meta_batch), k)
    return _timed(lambda: run(calls), calls, min_time)


def bench_peer_torch(meta_batch: int, k: int, calls: int, min_time: float, device: str) -> float | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    from scripts.bench.peers import common, torch_func

    run = torch_func.setup(common.sample_numpy_tasks(meta_batch), k, "cuda" if device == "gpu" else "cpu")
    return _timed(lambda: run(calls), calls, min_time)


def measure_cell(impl: str, meta_batch: int, k: int, min_time: float, device: str) -> float | None:
    """Steps/s of one implementation on one cell (run inside its own process, see ``_cell``)."""
    chunk_len = 200 if meta_batch <= 100 else (20 if meta_batch <= 5000 else 4)
    calls = max(1, chunk_len // 4)
    if impl in VARIANTS:
        return bench_jmaml(meta_batch, k, impl, chunk_len, min_time)
    if impl == "jax_naive":
        return bench_peer_jax(meta_batch, k, calls, min_time)
    if impl == "torch_func":
        return bench_peer_torch(meta_batch, k, calls, min_time, device)
    raise ValueError(f"unknown implementation {impl!r}")


IMPLS = ("jmaml_rolled", "jmaml_unrolled", "jmaml_fused", "jmaml_bf16", "jax_naive", "torch_func")


def _cell(impl: str, meta_batch: int, k: int, min_time: float, device: str) -> float | dict | None:
    """Measures one cell in a fresh process, so no framework's threads, allocator or caches
    (torch's CUDA allocator, XLA's thread pools) affect another's numbers."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--device", device, "--cell",
           f"{impl},{meta_batch},{k},{min_time}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        if impl in ("jmaml_fused", "jmaml_bf16"):  # an opt-in variant that fails here is recorded, not fatal
            return {"failed": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"}
        raise RuntimeError(f"{impl} B={meta_batch} k={k} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["steps_per_s"]


def _better(a, b):
    """The faster of two measurements of one implementation (a failure record loses to a number)."""
    if isinstance(a, float) and isinstance(b, float):
        return max(a, b)
    return a if isinstance(a, float) else b


def steps_per_second(cells, min_time: float, device: str, log, out: list | None = None, save=None,
                     rounds: int = 1) -> list[dict]:
    """Each cell: every implementation in its own process, ``rounds`` times interleaved, the best kept
    (a noisy machine's bursts then hit one measurement, not an implementation)."""
    out = [] if out is None else out
    for meta_batch, k in cells:
        row = {"meta_batch": meta_batch, "k": k, "rounds": rounds}
        for _ in range(rounds):
            for impl in IMPLS:
                row[impl] = _better(row.get(impl), _cell(impl, meta_batch, k, min_time, device))
        row["jmaml"] = max(row["jmaml_rolled"], row["jmaml_unrolled"])
        row["jmaml_best_unroll"] = "full" if row["jmaml_unrolled"] > row["jmaml_rolled"] else "1 (rolled)"
        peers = [v for v in (row["jax_naive"], row["torch_func"]) if v]
        row["ratio_vs_best_peer"] = row["jmaml"] / max(peers)
        for variant in ("jmaml_fused", "jmaml_bf16"):
            if isinstance(row[variant], float):
                row[f"{variant}_vs_jmaml"] = row[variant] / row["jmaml"]
                row[f"{variant}_vs_naive"] = row[variant] / row["jax_naive"]
        log(f"steps/s B={meta_batch} k={k}: " + ", ".join(
            f"{n} {row[n]:.1f}" if isinstance(row[n], float) else f"{n} {row[n]}" for n in IMPLS if row[n]))
        out.append(row)
        if save:
            save()  # partial results survive a time limit
    return out


def _state_and_tasks(meta_batch: int):
    import jax
    import optax

    from jmaml import init_state
    from jmaml.core import models
    from jmaml.tasks import sinusoid

    model = models.mlp([1, 40, 40, 1])
    params = model.init(jax.random.key(0))
    opt = optax.adam(1e-3)
    return model, opt, init_state(params, opt, jax.random.key(1)), sinusoid.sample_tasks(jax.random.key(2), meta_batch)


def compile_times(ks, log) -> list[dict]:
    import jax

    from jmaml import make_loss, make_step
    from scripts.bench.peers import common, jax_naive

    model, opt, state, tasks = _state_and_tasks(25)
    loss = make_loss(model.apply, "mse")
    out = []
    for k in ks:
        step = jax.jit(make_step(opt, loss, inner_lr=0.01, num_inner_steps=k))
        t0 = time.perf_counter()
        step.lower(state, tasks).compile()
        t_jmaml = time.perf_counter() - t0
        _, naive_step, args = jax_naive.setup(common.sample_numpy_tasks(25), k)
        t0 = time.perf_counter()
        naive_step.lower(*args).compile()
        t_naive = time.perf_counter() - t0
        out.append({"k": k, "jmaml_s": t_jmaml, "jax_naive_s": t_naive})
        log(f"compile k={k}: jmaml {t_jmaml:.2f} s, naive {t_naive:.2f} s")
    return out


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    temp, arg, outp = ma.temp_size_in_bytes, ma.argument_size_in_bytes, ma.output_size_in_bytes
    alias = getattr(ma, "alias_size_in_bytes", 0)
    return {"temp_bytes": int(temp), "peak_bytes": int(temp + arg + outp - alias)}


def peak_memory(ks, log) -> list[dict]:
    import jax

    from jmaml import make_loss, make_step
    from scripts.bench.peers import common, jax_naive

    model, opt, state, tasks = _state_and_tasks(25)
    loss = make_loss(model.apply, "mse")
    out = []
    for k in ks:
        row = {"k": k}
        for remat in (False, True):
            step = jax.jit(make_step(opt, loss, inner_lr=0.01, num_inner_steps=k, remat=remat))
            row["remat" if remat else "plain"] = _memory(step.lower(state, tasks).compile())
        if k <= 100:
            _, naive_step, args = jax_naive.setup(common.sample_numpy_tasks(25), k)
            row["jax_naive"] = _memory(naive_step.lower(*args).compile())
        out.append(row)
        log(f"memory k={k}: plain {row['plain']['peak_bytes'] / 2**20:.2f} MiB, "
            f"remat {row['remat']['peak_bytes'] / 2**20:.2f} MiB")
    return out


def grid_vs_sequential(steps: int, log, sequential_compiling: bool = True) -> dict:
    import dataclasses

    import jax
    import numpy as np

    from jmaml.run import sweep, train

    alphas = tuple(float(a) for a in np.geomspace(1e-3, 3e-2, 8))
    betas = tuple(float(b) for b in np.geomspace(1e-4, 1e-2, 8))
    base = train.TrainConfig(steps=steps, log_every=steps, checkpoint_every=steps, pretrain=False)
    grid = sweep.Grid(alphas, betas, (1,), (0,))
    points = grid.points()

    t0 = time.perf_counter()
    swept = sweep.run_sweep(base, grid, evaluate=False)  # the product path: one population, one program
    t_grid = time.perf_counter() - t0
    grid_losses = np.asarray([[r["final_meta_loss"] for r in swept["rows"]]])
    log(f"grid: 64 runs x {steps} steps as one population: {t_grid:.1f} s (compile included)")

    out = {"points": len(points), "steps": steps, "grid_s": t_grid}
    if sequential_compiling:
        t0 = time.perf_counter()
        for a, b, k, s in points:
            cfg = dataclasses.replace(base, inner_lr=a, meta_lr=b, num_inner_steps=k, seed=s)
            state = train.initial_state(cfg)
            chunk = train.make_chunk(cfg)  # a separate run: its own trace and compilation
            _, m = chunk(state, steps)
            jax.block_until_ready(m["meta_loss"])
        t_seq = time.perf_counter() - t0
        out.update({"sequential_compiling_s": t_seq, "ratio_vs_compiling": t_seq / t_grid})
        log(f"grid: 64 sequential runs, each compiling: {t_seq:.1f} s")
    out["grid_final_loss_range"] = [float(np.nanmin(grid_losses[-1])), float(np.nanmax(grid_losses[-1]))]
    return out


def step_costs(cells, log) -> list[dict]:
    """XLA's cost analysis of one compiled meta-step per cell and implementation: FLOPs and bytes
    accessed (the sum over the program's operations of what each reads and writes; fused operations
    count once). jmaml's step is the engine's, tasks sampled inside; the naive peer's on a fixed batch.
    The fused variant is counted as its mathematics written as plain XLA (the kernel is opaque to the
    cost analysis): its FLOPs are the kernel's; its bytes are what XLA would move for them unfused, an
    upper bound on the kernel's traffic (whose floor is its inputs and outputs)."""
    import jax

    from jmaml.core import fused
    from jmaml.engine import loop as engine
    from jmaml.run import recipes, train
    from scripts.bench.peers import common, jax_naive

    out = []
    for meta_batch, k in cells:
        row = {"meta_batch": meta_batch, "k": k}
        for impl in ("jmaml_unrolled", "jmaml_rolled", "jmaml_fused", "jmaml_bf16"):
            config = _config(meta_batch, k, impl)
            learner, dist, opt = recipes.phase_parts(config, config.algo)
            if impl == "jmaml_fused":
                # XLA cannot see inside a Pallas kernel (a custom call on GPU; in interpret mode a loop over
                # blocks, whose body it counts once): count the same hand-written mathematics unfused instead
                est = fused.maml_estimator(recipes.build_model(config)[1], num_inner_steps=k, use_pallas=False)
                learner = learner._replace(estimate=lambda p, t, meta_step=None, est=est, **kw: est(
                    p, t, inner_lr=kw.get("inner_lr", config.inner_lr)))
            one = engine.make_sampled_step(learner, dist, opt, meta_batch_size=meta_batch)
            try:
                row[impl] = program_cost(jax.jit(one).lower(train.initial_state(config), dist.data).compile())
                if impl == "jmaml_fused":  # the kernel's own reads and writes: task data, θ, outputs
                    tasks = jax.eval_shape(lambda key: engine.sample_tasks(dist, key, meta_batch), jax.random.key(0))
                    params = recipes.initial_params(config)
                    blocks = -(-meta_batch // fused.DEFAULT_BLOCK_TASKS)
                    size = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))  # noqa: E731
                    row[impl]["kernel_io_bytes"] = float(size(tasks) + size(params) * (1 + blocks) + 3 * 4 * meta_batch)
            except Exception as e:  # noqa: BLE001 - a variant that does not compile here is recorded
                row[impl] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        _, naive_step, args = jax_naive.setup(common.sample_numpy_tasks(meta_batch), k)
        row["jax_naive"] = program_cost(naive_step.lower(*args).compile())
        out.append(row)
        log(f"cost B={meta_batch} k={k}: " + ", ".join(
            f"{n} {c['flops'] / 1e6:.1f} MFLOP {c['bytes'] / 1e6:.1f} MB" for n, c in row.items()
            if isinstance(c, dict) and "flops" in c))
    return out


def roofline(result: dict) -> list[dict]:
    """Per cell and implementation: the achieved FLOP/s and bytes/s (cost x measured steps/s), their
    fractions of the device's peak, and what bounds it."""
    peaks = result.get("ceilings", {})
    steps = {(c["meta_batch"], c["k"]): c for c in result.get("steps_per_second", [])}
    rows = []
    for cost in result.get("costs", []):
        measured = steps.get((cost["meta_batch"], cost["k"]))
        if not measured:
            continue
        for impl in ("jmaml_unrolled", "jmaml_rolled", "jmaml_fused", "jmaml_bf16", "jax_naive"):
            c, rate = cost.get(impl), measured.get(impl)
            if not isinstance(c, dict) or "flops" not in c or not isinstance(rate, float):
                continue
            rows.append({"meta_batch": cost["meta_batch"], "k": cost["k"], "impl": impl, "steps_per_s": rate,
                         "flops": c["flops"], "bytes": c["bytes"], **point(c["flops"], c["bytes"], rate, peaks)})
    return rows


def breakdown(log) -> dict:
    """Where a small meta-step's time goes (B = 25, k = 1): a measured profile."""
    import jax
    import jax.numpy as jnp

    from jmaml import make_loss, make_step
    from jmaml.tasks import sinusoid

    model, opt, state, tasks = _state_and_tasks(25)
    loss = make_loss(model.apply, "mse")
    step = make_step(opt, loss, inner_lr=0.01, num_inner_steps=1)
    n = 500

    def scan_of(fn):
        f = jax.jit(lambda s: jax.lax.scan(lambda c, _: (fn(c), None), s, None, length=n)[0])
        jax.block_until_ready(f(state))
        t0 = time.perf_counter()
        jax.block_until_ready(f(state))
        return (time.perf_counter() - t0) / n * 1e6

    key = jax.random.key(0)
    f_sample = jax.jit(lambda k: jax.lax.scan(
        lambda c, _: (jax.random.split(c)[0], sinusoid.sample_tasks(c, 25).support.x.sum()), k, None, length=n)[1])
    jax.block_until_ready(f_sample(key))
    t0 = time.perf_counter()
    jax.block_until_ready(f_sample(key))
    sample_us = (time.perf_counter() - t0) / n * 1e6
    step_us = scan_of(lambda s: step(s, tasks)[0])
    fwd = jax.jit(lambda p: jnp.mean(jax.vmap(loss, in_axes=(None, 0))(p, tasks.query)))
    fwd_us = scan_of(lambda s: s._replace(params=jax.tree.map(lambda p: p + 0 * fwd(s.params), s.params)))
    noop = jax.jit(lambda x: x + 1)
    x = jnp.zeros(())
    noop(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n):
        x = noop(x)
    x.block_until_ready()
    dispatch_us = (time.perf_counter() - t0) / n * 1e6
    out = {"sample_tasks_us": sample_us, "meta_step_us": step_us, "forward_query_us": fwd_us,
           "jit_dispatch_us": dispatch_us}
    log("breakdown (us per step): " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()))
    return out


def to_markdown(r: dict) -> str:
    m = r["machine"]
    who = m["device_kind"] if m["device"] == "gpu" else f"{m.get('cpu')}, {m['cpu_count']} cores"
    lines = [f"### {m['device'].upper()}: {who}", "",
             f"JAX {m['jax']}, Python {m['python']}, torch {m.get('torch')}; {r['date']}", "",
             "**Meta-steps per second** (higher is better; ratio = jmaml / the better peer; fused and bf16 are "
             "opt-in variants of jmaml, shown with their ratio to jmaml's default step and to the naive JAX step)",
             "", "| meta-batch | k | jmaml | jmaml rolled / unrolled | fused (vs jmaml, vs naive) | bf16 (vs jmaml) "
             "| JAX naive | torch.func | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def variant(c, name, against_naive):
        v = c.get(name)
        if not isinstance(v, float):
            return "n/a" if v is None else f"failed: {v.get('failed', '?')[:60]}"
        more = f", {c[name + '_vs_naive']:.2f}x" if against_naive else ""
        return f"{v:.1f} ({c[name + '_vs_jmaml']:.2f}x{more})"

    for c in r["steps_per_second"]:
        torch_s = f"{c['torch_func']:.1f}" if c["torch_func"] else "n/a"
        lines.append(f"| {c['meta_batch']} | {c['k']} | {c['jmaml']:.1f} | {c['jmaml_rolled']:.1f} / "
                     f"{c['jmaml_unrolled']:.1f} | {variant(c, 'jmaml_fused', True)} | "
                     f"{variant(c, 'jmaml_bf16', False)} | {c['jax_naive']:.1f} | {torch_s} | "
                     f"{c['ratio_vs_best_peer']:.2f}x |")
    if r.get("ceilings") and r.get("costs"):
        p = r["ceilings"]
        pf, pb = peak_rates(p)
        peak = (f"FP32 {p['peak_flops'] / 1e9:,.0f} GFLOP/s" if p.get("peak_flops") else "FP32 not known") \
            + (f", {p['peak_bytes_per_s'] / 1e9:,.0f} GB/s" if p.get("peak_bytes_per_s") else "")
        lines += ["", "**Roofline** (XLA's `cost_analysis()` of one compiled meta-step x the measured steps/s)", "",
                  f"Datasheet or nominal peaks: {peak} ({p.get('peak_source')}). Measured here with XLA: "
                  f"{p['measured_flops'] / 1e9:,.1f} GFLOP/s, {p['measured_bytes_per_s'] / 1e9:,.1f} GB/s "
                  f"({p['measured_how']}). The fractions below are of {pf / 1e9:,.0f} GFLOP/s and "
                  f"{pb / 1e9:,.1f} GB/s (ridge point {pf / pb:,.1f} FLOP/byte). Bytes are XLA's per-operation "
                  "reads and writes, so data served from cache counts too.", "",
                  "| meta-batch | k | implementation | MFLOP / step | MB / step | FLOP/byte | GFLOP/s | GB/s | "
                  "% peak FLOP/s | % peak bytes/s | bound |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in r.get("roofline", []):
            lines.append(f"| {x['meta_batch']} | {x['k']} | {x['impl']} | {x['flops'] / 1e6:,.1f} | "
                         f"{x['bytes'] / 1e6:,.1f} | {x['intensity']:.2f} | {x['flops_per_s'] / 1e9:,.2f} | "
                         f"{x['bytes_per_s'] / 1e9:,.2f} | {100 * x['fraction_peak_flops']:.1f}% | "
                         f"{100 * x['fraction_peak_bytes']:.1f}% | {x['bound']} |")
        io = [(c["meta_batch"], c["k"], c["jmaml_fused"]["kernel_io_bytes"], c["jmaml_unrolled"]["bytes"])
              for c in r["costs"] if "kernel_io_bytes" in c.get("jmaml_fused", {})]
        if io:
            lines += ["", "The fused rows count the kernel's mathematics as XLA would run it unfused. What the kernel "
                      "itself must read and write per step (task data, θ, per-block gradients, per-task losses): "
                      + "; ".join(f"B = {b}, k = {k}: {kb / 1e6:.2f} MB against XLA's {xb / 1e6:.1f} MB"
                                  for b, k, kb, xb in io) + "."]
    if r.get("compile"):
        lines += ["", "**Compile time of one meta-step** (B = 25, trace + XLA compile)", "",
                  "| k | jmaml (scan) | JAX naive (unrolled) |", "| --- | --- | --- |"]
        lines += [f"| {c['k']} | {c['jmaml_s']:.2f} s | {c['jax_naive_s']:.2f} s |" for c in r["compile"]]
        c0, c1 = r["compile"][0], r["compile"][-1]
        lines.append(f"\njmaml compile at k = {c1['k']} / k = {c0['k']}: {c1['jmaml_s'] / c0['jmaml_s']:.2f}x "
                     f"(naive: {c1['jax_naive_s'] / c0['jax_naive_s']:.2f}x)")
    if r.get("memory"):
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        lines += ["", "**Peak memory of one meta-step** (B = 25; XLA buffer assignment)", "",
                  "| k | plain | remat | JAX naive |", "| --- | --- | --- | --- |"]
        for c in r["memory"]:
            naive = mib(c["jax_naive"]["peak_bytes"]) if "jax_naive" in c else "not compiled"
            lines.append(f"| {c['k']} | {mib(c['plain']['peak_bytes'])} | {mib(c['remat']['peak_bytes'])} | {naive} |")
        first, last = r["memory"][0], r["memory"][-1]
        lines.append(f"\nremat at k = {last['k']} vs k = {first['k']}: "
                     f"{last['remat']['peak_bytes'] / first['plain']['peak_bytes']:.2f}x the plain k = {first['k']} "
                     f"step, {last['remat']['peak_bytes'] / first['remat']['peak_bytes']:.2f}x the remat one")
    if r.get("grid"):
        g = r["grid"]
        lines += ["", f"**{g['points']}-point alpha x beta grid, {g['steps']} meta-steps each** (k = 1, B = 25)", "",
                  "| one population (vmapped program) | 64 runs each compiling |",
                  "| --- | --- |",
                  f"| {g['grid_s']:.1f} s | "
                  + (f"{g['sequential_compiling_s']:.1f} s ({g['ratio_vs_compiling']:.1f}x slower) |"
                     if "sequential_compiling_s" in g else "not run |")]
    if r.get("breakdown"):
        b = r["breakdown"]
        lines += ["", "**Where a small step's time goes** (B = 25, k = 1, per step, inside a scan)", "",
                  f"sampling 25 tasks {b['sample_tasks_us']:.0f} us; whole meta-step on fixed tasks "
                  f"{b['meta_step_us']:.0f} us; one forward pass of the query sets {b['forward_query_us']:.0f} us; "
                  f"one jitted call's dispatch {b['jit_dispatch_us']:.0f} us"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", default=None, help="output prefix (default scripts/bench/results/<device>)")
    parser.add_argument("--quick", action="store_true", help="short measurements, fewer cells")
    parser.add_argument("--only", default="steps,roofline,compile,memory,grid,breakdown",
                        help="comma-separated parts to run (also, not run by default: blocks, the blocked task "
                             "axis at B = 1000 and 10,000; rl, meta-RL environment steps/s against a PyTorch peer)")
    parser.add_argument("--grid-steps", type=int, default=None)
    parser.add_argument("--min-time", type=float, default=None, help="seconds per measurement (default 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="measure each cell this many times, interleaved, keep the best (default 2 on CPU)")
    parser.add_argument("--merge", action="store_true",
                        help="update the parts run now in an existing result file, keep the others")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    _device_setup(args.device)
    import jax

    if args.cell:
        impl, b, k, t = args.cell.split(",")
        print(json.dumps({"steps_per_s": measure_cell(impl, int(b), int(k), float(t), args.device)}))
        return 0

    if args.device == "gpu" and jax.devices()[0].platform != "gpu":
        raise SystemExit(f"--device gpu, but JAX sees {jax.devices()}")
    only = set(args.only.split(","))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    min_time = args.min_time or (0.5 if args.quick else 2.0)
    cells = [(25, 1), (25, 5), (1000, 1), (1000, 5)]
    if args.device == "gpu":
        cells += [(100_000, 1), (100_000, 5)]
    if args.quick:
        cells = cells[:2]
    result = {"machine": machine_info(args.device), "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    log(f"machine: {result['machine']}")
    prefix = args.out or os.path.join(ROOT, "scripts", "bench", "results", args.device)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)

    def save_partial():
        with open(prefix + ".partial.json", "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)

    if "steps" in only:
        result["steps_per_second"] = []
        steps_per_second(cells, min_time, args.device, log, out=result["steps_per_second"], save=save_partial,
                         rounds=args.rounds or (1 if args.quick or args.device == "gpu" else 2))
    if "roofline" in only:
        result["ceilings"] = ceilings(log)
        result["costs"] = step_costs(cells, log)
    if "compile" in only:
        result["compile"] = compile_times((1, 5, 25) if args.quick else (1, 5, 25, 100), log)
    if "memory" in only:
        result["memory"] = peak_memory((10, 100) if args.quick else (10, 100, 1000), log)
    if "grid" in only:
        steps = args.grid_steps or (100 if args.quick else 1000)
        result["grid"] = grid_vs_sequential(steps, log, sequential_compiling=args.device == "cpu")
    if "breakdown" in only:
        result["breakdown"] = breakdown(log)
    if "blocks" in only:  # the task axis in blocks at large meta-batches (scripts/bench/blocks_bench.py)
        from scripts.bench.blocks_bench import measure as measure_blocks

        block_cells = [(1000, 1), (1000, 5)] if args.quick else [(1000, 1), (1000, 5), (10_000, 1), (10_000, 5)]
        if args.device == "gpu":
            block_cells = [(10_000, 1), (10_000, 5), (100_000, 1), (100_000, 5)]
        result["blocks"] = measure_blocks(block_cells, args.rounds or (2 if args.device == "cpu" else 1), min_time,
                                          log, result.get("ceilings"))
    if "rl" in only:  # meta-RL environment steps/s against the PyTorch peer (scripts/bench/rl_bench.py)
        from scripts.bench.rl_bench import measure as measure_rl

        result["rl"] = measure_rl(args.rounds or 2, max(min_time, 2.0), log)
    if os.path.exists(prefix + ".partial.json"):
        os.remove(prefix + ".partial.json")
    if args.merge and os.path.exists(prefix + ".json"):  # keep the parts not rerun this time
        with open(prefix + ".json", encoding="utf-8") as f:
            result = {**json.load(f), **result}
    result["roofline"] = roofline(result) if result.get("ceilings") else result.get("roofline", [])
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    md = to_markdown(result) if "steps_per_second" in result else json.dumps(
        {k: v for k, v in result.items() if k not in ("blocks", "rl")}, indent=2)
    if result.get("blocks"):
        from scripts.bench.blocks_bench import to_markdown as blocks_markdown

        md += "\n\n" + blocks_markdown({"machine": result["machine"].get("cpu") or result["machine"],
                                        "date": result["date"], "rounds": args.rounds or 2, "cells": result["blocks"]})
    if result.get("rl"):
        from scripts.bench.rl_bench import to_markdown as rl_markdown

        md += "\n\n" + rl_markdown({"machine": result["machine"].get("cpu") or result["machine"],
                                    "date": result["date"], "rl": result["rl"]})
    with open(prefix + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
