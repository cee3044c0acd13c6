#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with an NVIDIA GPU and JAX/torch installed
# (run from the repository root with PYTHONPATH=.): the test suite on the GPU (JAX 0.11 there),
# then the GPU benchmark cells. Output goes under ${OUT:-gpu_out}.
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=.
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch shares the card in the benchmark
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, optax, chex; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__, 'chex', chex.__version__)" | tee -a "$out/gpu.txt"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q tests 2>&1 | tail -25 | tee "$out/tests.txt"
timeout "${BENCH_TIMEOUT:-240}" python3 scripts/bench.py --device gpu --only steps,breakdown --min-time 1 \
  --out "$out/gpu" 2>&1 | tail -40
# the task axis in blocks at GPU-sized meta-batches (issue 23): whole batch, auto's block, naive JAX
timeout "${BLOCKS_TIMEOUT:-240}" python3 scripts/bench/blocks_bench.py --cells 10000x1,10000x5,100000x1,100000x5 \
  --rounds 1 --min-time 1 --out "$out/blocks_gpu" 2>&1 | tail -12
# the Conv-4 image step at its meta-batch, as before and blocked (issue 23)
timeout "${IMAGES_TIMEOUT:-240}" python3 scripts/bench/blocks_bench.py --cells conv4-omniglot,conv4-miniimagenet \
  --rounds 1 --min-time 1 --out "$out/blocks_images_gpu" 2>&1 | tail -8
# meta-RL environment steps/s, jmaml on the GPU against the PyTorch peer (issue 24)
timeout "${RL_TIMEOUT:-180}" python3 scripts/bench/rl_bench.py --rounds 1 --min-time 3 --out "$out/rl_gpu" 2>&1 | tail -10
