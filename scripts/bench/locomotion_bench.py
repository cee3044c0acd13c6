"""The cost of one meta-step of the paper's locomotion runs (jmaml.rl.brax, MJX physics): half-cheetah and ant
at the paper's settings (``RLConfig.paper``: horizon 200, 40 tasks per meta-step, 20 inner + 20 outer episodes
per task -- ant direction 40 + 40 --, a 100-100 ReLU policy, TRPO), on whatever device JAX has.

Each row: the compile time of a one-meta-step chunk, the best wall time of ``--rounds`` calls of it, and the
environment steps per second (inner and outer rollouts: meta-batch x episodes x horizon x 2). On a small CPU
the paper's size takes long; ``--meta-batch``/``--episodes`` shrink it and the row says so (the rollouts'
cost is linear in both: the tasks and episodes are one vmapped batch).

    python scripts/bench/locomotion_bench.py [--envs halfcheetah_velocity,ant_direction] [--outer trpo]
        [--meta-batch 40] [--episodes 20] [--rounds 2] [--out scripts/bench/results]

Writes ``locomotion_<device>.json`` and ``.md`` in ``--out``. Needs the jmaml[brax] extra. A benchmark, not a
test.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def measure_env(name: str, outer: str, meta_batch: int | None, episodes: int | None, horizon: int | None,
                rounds: int, log) -> dict:
    import jax
    import optax

    from jmaml.engine import loop as engine
    from jmaml.rl.learner import task_distribution, trpo_optimiser
    from jmaml.run.rl_recipe import RLConfig

    settings = {k: v for k, v in (("meta_batch_size", meta_batch), ("horizon", horizon)) if v is not None}
    if episodes is not None:
        settings.update(inner_episodes=episodes, outer_episodes=episodes)
    config = RLConfig.paper(name, outer=outer, **settings).validate()
    paper = RLConfig.paper(name)
    env, policy, maml, _ = config.parts()
    opt = trpo_optimiser() if outer != "adam" else optax.adam(config.meta_lr)  # as rl_recipe.train
    chunk = engine.make_chunk(maml, task_distribution(env), opt, meta_batch_size=config.meta_batch_size)
    state = engine.initial_state(maml, policy.init(jax.random.key(0)), opt, jax.random.key(1))
    t0 = time.perf_counter()
    with jax.numpy_rank_promotion("allow"):  # brax's own code broadcasts by rank promotion
        state, m = chunk(state, 1)
        jax.block_until_ready(m["meta_loss"])
    first = time.perf_counter() - t0  # compile + one meta-step
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with jax.numpy_rank_promotion("allow"):
            state, m = chunk(state, 1)
            jax.block_until_ready(m["meta_loss"])
        times.append(time.perf_counter() - t0)
    best = min(times)
    env_steps = config.meta_batch_size * (config.inner_episodes + config.outer_episodes) * config.horizon
    paper_steps = paper.meta_batch_size * (paper.inner_episodes + paper.outer_episodes) * paper.horizon
    row = {"env": name, "outer": outer, "meta_batch_size": config.meta_batch_size,
           "episodes": config.inner_episodes, "horizon": config.horizon, "paper_size": env_steps == paper_steps,
           "compile_and_first_s": first, "meta_step_s": best, "times_s": times, "env_steps": env_steps,
           "env_steps_per_s": env_steps / best, "paper_env_steps": paper_steps,
           "paper_meta_step_s_estimate": best * paper_steps / env_steps,
           "meta_loss": float(jax.numpy.ravel(m["meta_loss"])[-1])}
    log(f"{name} {outer}: {config.meta_batch_size} tasks x {config.inner_episodes}+{config.outer_episodes} "
        f"episodes x {config.horizon} steps: compile+first {first:.1f} s, meta-step {best:.2f} s "
        f"({row['env_steps_per_s']:,.0f} env steps/s)")
    return row


def to_markdown(result: dict) -> str:
    lines = [f"### Locomotion meta-step (MJX physics): {result['machine']}", "",
             f"{result['date']}; device {result['device']}; best of {result['rounds']} call(s) of a one-meta-step "
             "chunk after its compile; env steps: inner + outer rollouts (tasks x episodes x horizon x 2).", "",
             "| env | outer | tasks | episodes | horizon | compile + first (s) | meta-step (s) | env steps/s | "
             "paper-size meta-step (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        paper = (f"{r['meta_step_s']:.2f} (measured)" if r["paper_size"]
                 else f"{r['paper_meta_step_s_estimate']:.1f} (x{r['paper_env_steps'] / r['env_steps']:.0f}, linear)")
        lines.append(f"| {r['env']} | {r['outer']} | {r['meta_batch_size']} | {r['episodes']} | {r['horizon']} | "
                     f"{r['compile_and_first_s']:.1f} | {r['meta_step_s']:.2f} | {r['env_steps_per_s']:,.0f} | "
                     f"{paper} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", default="halfcheetah_velocity,ant_direction")
    p.add_argument("--outer", default="trpo", choices=("trpo", "adam", "ppo", "promp"))
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default: the paper's 40)")
    p.add_argument("--episodes", type=int, default=None, help="episodes per step (default: the paper's)")
    p.add_argument("--horizon", type=int, default=None, help="default: the paper's 200")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "bench", "results"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jax

    from scripts.bench import write_result

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows = [measure_env(name, args.outer, args.meta_batch, args.episodes, args.horizon, args.rounds, log)
            for name in args.envs.split(",")]
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    from jmaml.core._util import machine_description

    result = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
              "device": f"{device.platform} ({kind})", "jax": jax.__version__, "rounds": args.rounds,
              "rows": [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in rows]}
    os.makedirs(args.out, exist_ok=True)
    write_result(result, os.path.join(args.out, f"locomotion_{device.platform}"), to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
