#!/usr/bin/env bash
# Downloads, here, the wheels that jmaml.rl.brax imports (brax, MuJoCo and MJX, and what they import that the GPU
# machine's Python 3.12 may lack) into ./gpu_wheels (git-ignored, about 56 MB): the GPU machine has no package
# index, so scripts/gpu_check_locomotion.sh installs them from there (carry: ["gpu_wheels"]).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh dev >/dev/null
pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 -d gpu_wheels \
  brax==0.14.2 mujoco-mjx==3.17.0 mujoco==4.0.1 mujoco-core==4.0.1 flax treescope jaxopt glfw trimesh absl-py \
  msgpack rich pygments markdown-it-py mdurl pyyaml etils scipy 2>&1 | grep -v "^WARNING" | tail -3
du -sh gpu_wheels
