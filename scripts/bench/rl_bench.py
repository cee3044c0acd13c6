"""Meta-RL throughput: environment steps per second of meta-training (rollouts + meta-gradient + update)
on 2D navigation, jmaml's compiled chunk against a PyTorch peer with the usual Python rollout loop
(``scripts/bench/peers/torch_maml_rl.py``), same algorithm and batch sizes (meta-batch 20 tasks, 20 inner +
20 outer episodes of 100 steps, policy 2-100-100-2), interleaved rounds in one process, the best kept.

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


def jmaml_runner(chunk_len: int = 5):
    import jax
    import optax

    from jmaml import engine, rl
    from scripts.bench import timed_chunk

    env = rl.envs.navigation2d(horizon=HORIZON)
    policy = rl.policies.gaussian_mlp(2, 2, hidden=HIDDEN)
    learner = rl.maml_rl(env, policy, inner_lr=0.1, inner_episodes=EPISODES, outer_episodes=EPISODES)
    opt = optax.adam(1e-2)
    chunk = engine.make_chunk(learner, rl.task_distribution(env), opt, meta_batch_size=META_BATCH)
    state = engine.initial_state(learner, policy.init(jax.random.key(0)), opt, jax.random.key(1))
    return timed_chunk(chunk, state, chunk_len), chunk_len


def measure(rounds: int, min_time: float, log) -> dict:
    env_steps = META_BATCH * 2 * EPISODES * HORIZON
    runners = {"jmaml": jmaml_runner()}
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
    out = {"env_steps_per_meta_step": env_steps,
           "meta_steps_per_s": best, "env_steps_per_s": {n: r * env_steps for n, r in best.items()}}
    if "torch" in best:
        out["ratio"] = best["jmaml"] / best["torch"]
    return out


def to_markdown(result: dict) -> str:
    r = result["rl"]
    lines = [f"### Meta-RL, 2D navigation: {result['machine']}", "",
             f"{result['date']}; meta-training (rollouts, the meta-gradient, Adam), meta-batch {META_BATCH} tasks x "
             f"({EPISODES} inner + {EPISODES} outer episodes) x {HORIZON} steps = {r['env_steps_per_meta_step']:,} "
             "environment steps per meta-step; policy 2-100-100-2; interleaved rounds, best kept.", "",
             "| implementation | meta-steps/s | environment steps/s |", "| --- | --- | --- |"]
    for name, rate in r["meta_steps_per_s"].items():
        lines.append(f"| {name} | {rate:.3f} | {r['env_steps_per_s'][name]:,.0f} |")
    if "ratio" in r:
        lines += ["", f"jmaml / torch: **{r['ratio']:.1f}x**"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=5.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import jax

    from jmaml._util import machine_description
    from scripts.bench import write_result

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    device = jax.devices()[0].platform
    result = {"machine": machine_description(), "device": device, "date": time.strftime("%Y-%m-%d"),
              "rl": measure(args.rounds, args.min_time, log)}
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
