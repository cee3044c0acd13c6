"""Roofline helpers shared by ``scripts/bench.py`` and ``scripts/bench/blocks_bench.py``: the device's
peaks (datasheet or nominal) and ceilings measured with XLA, XLA's cost analysis of a compiled program,
and where a measured rate puts it against those roofs."""

from __future__ import annotations

import os
import time

# Datasheet peaks (dense FP32 without tensor cores, and memory bandwidth) of the cards measured.
GPU_PEAKS = {
    "H200": (67e12, 4.8e12, "NVIDIA H200 SXM datasheet: 67 TFLOPS FP32, 4.8 TB/s HBM3e"),
    "H100 PCIe": (51e12, 2.0e12, "NVIDIA H100 PCIe datasheet: 51 TFLOPS FP32, 2.0 TB/s HBM2e"),
    "H100": (67e12, 3.35e12, "NVIDIA H100 SXM datasheet: 67 TFLOPS FP32, 3.35 TB/s HBM3"),
}


def _cpu_nominal_peak() -> tuple[float | None, str]:
    """cores x clock x FP32 FLOP per cycle, from /proc/cpuinfo (x86 only): 2 FMA pipes x 8 lanes (AVX2;
    AMD Zen 4 runs AVX-512 on 256-bit pipes) or x 16 lanes (Intel AVX-512) x 2 FLOP per FMA."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None, "no /proc/cpuinfo"
    mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    if not mhz or " fma" not in flags:
        return None, "clock or FMA support unknown"
    intel512 = "GenuineIntel" in text and "avx512f" in flags
    per_cycle = 64 if intel512 else 32
    cores = os.cpu_count() or 1
    return cores * mhz[0] * 1e6 * per_cycle, (f"nominal: {cores} cores x {mhz[0] / 1000:.2f} GHz (cpuinfo) x "
                                              f"{per_cycle} FP32 FLOP/cycle (2 FMA pipes x {per_cycle // 4} lanes "
                                              "x 2); no datasheet bandwidth for this VM's share of the host")


def ceilings(log) -> dict:
    """The device's peaks: datasheet (GPU) or nominal (CPU) where known, and ceilings measured here with
    XLA -- a large float32 matmul (FLOP/s) and a large elementwise add (read + write bytes/s)."""
    import jax
    import jax.numpy as jnp

    def best(f, *args, repeats=5):
        jax.block_until_ready(f(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - t0)
        return min(times)

    gpu = jax.devices()[0].platform == "gpu"
    n = 8192 if gpu else 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: jnp.dot(x, x, precision=jax.lax.Precision.HIGHEST))
    flops = 2 * n**3 / best(matmul, a)
    m = (1 << 28) if gpu else (1 << 25)  # elements: 1 GiB / 128 MiB per array
    # in place (the input buffer donated): a fresh output buffer each call would time the allocator's page
    # faults, not the memory (measured on the CPU here: 6.5 GB/s that way, against NumPy's 33 GB/s)
    add = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    state = {"x": jnp.ones((m,), jnp.float32)}

    def add_in_place():
        state["x"] = add(state["x"])
        return state["x"]

    bandwidth = 2 * 4 * m / best(add_in_place, repeats=30)
    out = {"measured_flops": flops, "measured_bytes_per_s": bandwidth,
           "measured_how": f"{n}x{n} float32 matmul (HIGHEST precision); {4 * m >> 20} MiB elementwise add in "
                           "place (read + write)"}
    kind = jax.devices()[0].device_kind
    if gpu:
        for name, (pf, pb, source) in GPU_PEAKS.items():
            if name in kind:
                out.update({"peak_flops": pf, "peak_bytes_per_s": pb, "peak_source": source})
                break
    else:
        pf, source = _cpu_nominal_peak()
        out.update({"peak_flops": pf, "peak_bytes_per_s": None, "peak_source": source})
    log(f"ceilings: measured {flops / 1e9:.1f} GFLOP/s, {bandwidth / 1e9:.1f} GB/s; peak {out.get('peak_source')}")
    return out


def program_cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0]
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def peak_rates(ceil: dict) -> tuple[float, float]:
    """The FLOP/s and bytes/s that fractions are taken of: a GPU's datasheet peaks; on a CPU the larger of
    the nominal and the measured FLOP/s (a VM's cores may boost above the clock cpuinfo reports) and the
    measured bandwidth (no datasheet figure for a VM's share of the host's memory)."""
    flops = max(ceil.get("peak_flops") or 0.0, ceil.get("measured_flops") or 0.0)
    if ceil.get("peak_flops") and ceil.get("peak_bytes_per_s"):  # a datasheet pair
        return ceil["peak_flops"], ceil["peak_bytes_per_s"]
    return flops, ceil.get("peak_bytes_per_s") or ceil["measured_bytes_per_s"]



def point(flops: float, nbytes: float, rate: float, ceil: dict) -> dict:
    """A program of ``flops`` and ``nbytes`` per step at ``rate`` steps/s: achieved FLOP/s and bytes/s, their
    fractions of the peaks (``peak_rates``) and the bound they point at."""
    pf, pb = peak_rates(ceil)
    flops_s, bytes_s = flops * rate, nbytes * rate
    intensity = flops / nbytes if nbytes else float("inf")
    fp, fb = flops_s / pf, bytes_s / pb
    roof = "memory" if intensity < pf / pb else "compute"  # the roof the intensity points at
    if fb > 1:
        bound = "cache (more bytes/s than memory gives)"
    elif max(fp, fb) < 0.5:
        bound = f"neither roof: under half of both ({roof} roof nearer)"
    else:
        bound = roof
    return {"flops_per_s": flops_s, "bytes_per_s": bytes_s, "intensity": intensity, "fraction_peak_flops": fp,
            "fraction_peak_bytes": fb, "bound": bound}
