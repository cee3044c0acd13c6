#!/usr/bin/env bash
# Issue 16's GPU checks, as one script for a machine with an NVIDIA GPU and JAX installed (run from the
# repository root): the fused kernel's and mixed precision's tests compiled for the GPU (not interpret
# mode), then the benchmark's steps/s, roofline and grid parts for the GPU cells (B up to 100,000).
# Output goes under ${OUT:-gpu_out}.
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=.
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # each benchmark cell is its own process beside the main one
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/fused_test.py tests/precision_test.py \
  2>&1 | tail -30 | tee "$out/tests_fused.txt"
for k in 5 1; do
  timeout 90 python3 scripts/bench/fused_blocks.py 100000 "$k" 8,32,128 2>&1 | tail -6 | tee -a "$out/fused_blocks.jsonl"
done
timeout "${BENCH_TIMEOUT:-360}" python3 scripts/bench.py --device gpu --only steps,roofline,grid --min-time 1 \
  --grid-steps 200 --out "$out/gpu" 2>&1 | tail -60
