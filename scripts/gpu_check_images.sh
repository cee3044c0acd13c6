#!/usr/bin/env bash
# GPU checks for few-shot image classification (run from the repository root; output under ${OUT:-gpu_out}):
# meta-steps/s against torch.func on the same card, then the image tests with JAX 0.11.
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=.
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch shares the card
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
timeout 300 python3 scripts/bench/images_bench.py --min-time 2 --out "$out" 2>&1 | tail -12
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/images_test.py 2>&1 | tail -5 | tee "$out/tests_images.txt"
