"""Meta-RL throughput: environment steps per second of meta-training (rollouts + meta-gradient + update)
on 2D navigation: jmaml's compiled chunk (the gradient and the TRPO outer step, and the baseline's two
solvers) against a JAX peer written without jmaml (``scripts/bench/peers/jax_maml_rl.py``) and a PyTorch
peer with the usual Python rollout loop (``scripts/bench/peers/torch_maml_rl.py``), same algorithm and
batch sizes (meta-batch 20 tasks, 20 inner + 20 outer episodes of 100 steps, policy 2-100-100-2),
interleaved rounds in one process, the best kept; each program's FLOPs (XLA's cost analysis of one
meta-step) as a fraction of the peak (``roofline``).

    python scripts/bench/rl_bench.py [--rounds 2] [--min-time 5]

Writes ``scripts/bench/results/rl_<device>.json`` and ``.md``. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

META_BATCH, EPISODES, HORIZON, HIDDEN = 20, 20, 100, (100, 100)


def jmaml_runner(chunk_len: int = 5, outer: str = "gradient", solver: str = "cholesky", **settings):
    """``(run, chunk_len, compiled one-step program)`` for jmaml's chunk: MAML-RL with the ``outer`` step (Adam on
    the meta-gradient, or TRPO) and the linear baseline by ``solver``."""
    import functools

    import jax
    import optax

    from jmaml import rl
    from jmaml.core import protocols
    from jmaml.engine import loop as engine
    from jmaml.rl import rollouts
    from scripts.bench import timed_chunk

    env = rl.envs.navigation2d(horizon=HORIZON)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=HIDDEN)
    learner = rl.maml_rl(env, policy, inner_lr=0.1, inner_episodes=EPISODES, outer_episodes=EPISODES, outer=outer,
                         **settings)
    opt = optax.adam(1e-2) if outer == "gradient" else protocols.apply_step()
    chunk = engine.make_chunk(learner, rl.task_distribution(env), opt, meta_batch_size=META_BATCH)
    state = engine.initial_state(learner, policy.init(jax.random.key(0)), opt, jax.random.key(1))
    fit = rollouts.linear_baseline
    rollouts.linear_baseline = functools.partial(fit, solver=solver)  # read when the programs are traced
    try:
        run = timed_chunk(chunk, state, chunk_len)
        run()  # compiles the chunk
        one = jax.jit(lambda s: chunk(s, 1)).lower(state).compile()  # one meta-step, for XLA's cost analysis
    finally:
        rollouts.linear_baseline = fit
    return run, chunk_len, one


def measure(rounds: int, min_time: float, log, ceil: dict | None = None) -> dict:
    from scripts.bench.roofline import point, program_cost

    env_steps = META_BATCH * 2 * EPISODES * HORIZON
    runners, programs = {}, {}
    for name, outer, solver, settings in (("jmaml", "gradient", "cholesky", {}),
                                          ("jmaml_trpo", "trpo", "cholesky", {}),
                                          ("jmaml_trpo_hessian_fvp", "trpo", "cholesky", {"trpo_fisher": "hessian"}),
                                          ("jmaml_trpo_cg_subsample_0.1", "trpo", "cholesky", {"cg_subsample": 0.1}),
                                          ("jmaml_promp", "promp", "cholesky", {}),
                                          ("jmaml_lstsq_baseline", "gradient", "lstsq", {})):
        run, per_call, one = jmaml_runner(outer=outer, solver=solver, **settings)
        runners[name], programs[name] = (run, per_call), one
    from scripts.bench.peers import jax_maml_rl

    peer_run, _ = jax_maml_rl.setup(META_BATCH, EPISODES, HORIZON, HIDDEN, steps_per_call=5)
    runners["jax_peer"] = (lambda: peer_run(1), 5)
    programs["jax_peer"] = jax_maml_rl.setup(META_BATCH, EPISODES, HORIZON, HIDDEN, steps_per_call=1)[1]
    try:
        from scripts.bench.peers import torch_maml_rl

        torch_run, _ = torch_maml_rl.setup(META_BATCH, EPISODES, HORIZON, HIDDEN)
        runners["torch"] = (lambda: torch_run(1), 1)
    except ImportError:
        log("torch is not installed: the peer's column stays empty")
    for run, _ in runners.values():
        run()  # compile / warm up
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, (run, per_call) in runners.items():
            calls, total = 0, 0.0
            while total < min_time:
                total += run()
                calls += 1
            best[name] = max(best.get(name, 0.0), per_call * calls / total)
            log(f"{name}: {best[name]:.3f} meta-steps/s")
    out: dict = {"env_steps_per_meta_step": env_steps,
                 "meta_steps_per_s": best, "env_steps_per_s": {n: r * env_steps for n, r in best.items()},
                 "ratios": {"jmaml_vs_jax_peer": best["jmaml"] / best["jax_peer"],
                            "trpo_time_vs_gradient_time": best["jmaml"] / best["jmaml_trpo"],
                            "trpo_gauss_newton_vs_hessian_fvp": best["jmaml_trpo"] / best["jmaml_trpo_hessian_fvp"],
                            "trpo_cg_subsample_0.1_time_vs_gradient_time":
                                best["jmaml"] / best["jmaml_trpo_cg_subsample_0.1"],
                            "promp_time_vs_gradient_time": best["jmaml"] / best["jmaml_promp"],
                            "cholesky_vs_lstsq_baseline": best["jmaml"] / best["jmaml_lstsq_baseline"]}}
    if "torch" in best:
        out["ratios"]["jmaml_vs_torch"] = best["jmaml"] / best["torch"]
    if ceil:
        out["ceilings"] = ceil
        out["roofline"] = {}
        for name, program in programs.items():
            c = program_cost(program)
            out["roofline"][name] = {"flops": c["flops"], "bytes": c["bytes"], **point(c["flops"], c["bytes"],
                                                                                       best[name], ceil)}
    return out


def to_markdown(result: dict) -> str:
    r = result["rl"]
    lines = [f"### Meta-RL, 2D navigation: {result['machine']}", "",
             f"{result['date']}; meta-training (rollouts, the meta-gradient, the outer step), meta-batch {META_BATCH} "
             f"tasks x ({EPISODES} inner + {EPISODES} outer episodes) x {HORIZON} steps = "
             f"{r['env_steps_per_meta_step']:,} environment steps per meta-step; policy 2-100-100-2; interleaved "
             "rounds, best kept. jmaml: Adam on the LVC meta-gradient (the linear baseline by Cholesky, the "
             "default); jmaml_trpo: `jmaml rl`'s default outer step (TRPO, the paper's; Fisher-vector products in "
             "Gauss-Newton form, the default); jmaml_trpo_hessian_fvp: the same TRPO with them as forward over "
             "reverse of the KL's gradient (trpo_fisher='hessian', before); jmaml_trpo_cg_subsample_0.1: TRPO with "
             "the Fisher of a tenth of the tasks (rllab's subsample_factor, an option); jmaml_promp: ProMP's outer "
             "step (PPO-clip, 5 epochs, inner KL penalty); jmaml_lstsq_baseline: the "
             "baseline by the SVD least squares used before; jax_peer: scripts/bench/peers/jax_maml_rl.py (the "
             "same algorithm written straight in JAX); torch: a PyTorch loop (peers/torch_maml_rl.py).", "",
             "| implementation | meta-steps/s | environment steps/s | GFLOP per meta-step (XLA) | fraction of peak "
             "FLOP/s |", "| --- | --- | --- | --- | --- |"]
    roof = r.get("roofline", {})
    for name, rate in r["meta_steps_per_s"].items():
        p = roof.get(name)
        lines.append(f"| {name} | {rate:.3f} | {r['env_steps_per_s'][name]:,.0f} | "
                     + (f"{p['flops'] / 1e9:.2f} | {p['fraction_peak_flops']:.1%} |" if p else "- | - |"))
    lines.append("")
    lines += [f"- {k.replace('_', ' ')}: **{v:.2f}x**" for k, v in r["ratios"].items()]
    if "ceilings" in r:
        c = r["ceilings"]
        lines += ["", f"Peak FLOP/s: the larger of {c.get('peak_source')} and the measured "
                      f"{c['measured_flops'] / 1e9:.1f} GFLOP/s ({c['measured_how']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=5.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import jax

    from jmaml.core._util import machine_description
    from scripts.bench import write_result

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    device = jax.devices()[0].platform
    from scripts.bench.roofline import ceilings

    result = {"machine": machine_description(), "device": device, "date": time.strftime("%Y-%m-%d"),
              "rl": measure(args.rounds, args.min_time, log, ceilings(log))}
    try:
        import torch

        result["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    except ImportError:
        pass
    write_result(result, args.out or os.path.join(ROOT, "scripts", "bench", "results", f"rl_{device}"),
                 to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
