#!/usr/bin/env bash
# GPU check for the paper's locomotion (jmaml.rl.brax on MJX), run from the repository root with the wheels of
# scripts/gpu_wheels.sh carried (run(carry=["gpu_wheels"])); output under ${OUT:-gpu_out}:
#   1. the cost of one paper-size meta-step (horizon 200, 40 tasks, 20 + 20 episodes; ant direction 40 + 40;
#      TRPO) for half-cheetah velocity and ant direction: scripts/bench/locomotion_bench.py;
#   2. a short paper-size training (6 meta-steps), `jmaml rl --env halfcheetah_velocity` with every other
#      setting the paper's: meta-steps/s from metrics.jsonl and the return after 0-3 test-time steps (eval.json,
#      the paper's protocol).
# Under 10 minutes by its timeouts (one run call); no GPU has run it yet (run end to end on a CPU at a tiny
# size). BENCH_ARGS and TRAIN_ARGS add flags to the two commands (a smoke run on a CPU:
# BENCH_ARGS="--meta-batch 2 --episodes 2 --horizon 5" TRAIN_ARGS="--horizon 5 ...").
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
site=/tmp/jmaml_site
export PYTHONPATH=".:$site"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
# what the machine lacks, from the carried wheels (a module already importable is left as it is)
for pair in brax:brax mujoco:mujoco- mujoco.mjx:mujoco_mjx flax:flax treescope:treescope jaxopt:jaxopt glfw:glfw \
            trimesh:trimesh absl:absl_py msgpack:msgpack rich:rich pygments:pygments markdown_it:markdown_it \
            mdurl:mdurl yaml:PyYAML etils:etils scipy:scipy; do
  module="${pair%%:*}"; wheel="${pair#*:}"
  if ! python3 -c "import $module" 2>/dev/null; then
    ls gpu_wheels/${wheel}*.whl gpu_wheels/$(echo "$wheel" | tr 'A-Z' 'a-z')*.whl 2>/dev/null | head -2
  fi
done | sort -u > /tmp/jmaml_wheels.txt
[ -s /tmp/jmaml_wheels.txt ] && pip install -q --no-deps --no-index --target "$site" $(cat /tmp/jmaml_wheels.txt) 2>&1 | tail -3
python3 -W ignore -c "import brax, mujoco.mjx; print('brax', brax.__version__)" | tee -a "$out/gpu.txt" || exit 1
timeout 220 python3 -W ignore scripts/bench/locomotion_bench.py --envs halfcheetah_velocity,ant_direction \
  --rounds 3 --out "$out" ${BENCH_ARGS:-} 2>&1 | tail -8
timeout 330 python3 -W ignore -m jmaml rl --env halfcheetah_velocity --steps 6 --log-every 3 --no-pretrain \
  --out "$out/halfcheetah_velocity" ${TRAIN_ARGS:-} 2>&1 | tail -14 | tee "$out/train.txt"
python3 - "$out/halfcheetah_velocity" <<'PY' | tee "$out/summary.txt"
import json, sys
run = sys.argv[1]
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl") if line.strip()]
print("meta-steps/s per chunk (the first includes its compile):", [round(r.get("steps_per_s", float("nan")), 4) for r in rows])
results = json.load(open(f"{run}/eval.json"))["results"]
for method, r in results.items():
    print(method, "return after 0..3 steps:", [round(v, 1) for v in r["mean"]])
PY
