#!/usr/bin/env bash
# Every GPU check of the project in one call, for a session that is lent a GPU (each step has its own timeout, 570 s in all: one 10-minute call).
# On the device machine, from the repo root, after installing the carried wheels (../shared/device/wheels.sh):
#   bash bench/gpu_checks.sh [path/to/gpu_anchor.py]      # results under $OUT (or gpu_out/), one file per check
# Record the JSON lines in docs/benchmarks.md with the device name.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python -c "import torch, deepspeed, transformers; print(torch.__version__, deepspeed.__version__, transformers.__version__)" 2>&1 | tail -1 | tee -a "$out/device.txt"
# 1. the anchor (baseline of every comparison), same machine, same call
if [ -n "${1:-}" ] && [ -f "$1" ]; then timeout 150 python "$1" 2>&1 | tee "$out/anchor.txt"; fi
# 2. fused vs plain KD loss at vocab 128256, 8192 tokens, hidden 2048, bf16 (+ Liger if installed)
timeout 150 python bench/kd_loss.py --gpu --reps 10 2>&1 | tee "$out/kd_loss.txt"
# 3. one trainer step (ZeRO-3 student + ZeRO-3 teacher, fused head) vs naive KD at the anchor's shapes
timeout 150 python bench/train_step.py --gpu 2>&1 | tee "$out/train_step.txt"
# 4. the GPU tests (bf16 ZeRO-3 distillation through the launcher, teacher offload)
timeout 120 python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$out/pytest_gpu.txt"
