#!/usr/bin/env bash
# GPU checks for the MAML family and scale-out (run from the repository root; output under ${OUT:-gpu_out}):
# their tests with JAX 0.11 (the multi-process ones run on CPU devices there too), iMAML's memory
# against k, and each algorithm's meta-step time on the card.
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
timeout 150 python3 scripts/imaml_memory.py --out "$out" 2>&1 | tail -12
timeout 150 python3 scripts/algo_step_time.py --k 1 --steps 2000 --out "$out" 2>&1 | tail -12
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/estimators_test.py tests/algorithms_test.py \
  tests/distributed_test.py 2>&1 | tail -15 | tee "$out/tests.txt"
