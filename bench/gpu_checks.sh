#!/usr/bin/env bash
# Every GPU check of the project in one call, for a session that is lent a GPU (each step has its own timeout, 570 s
# in all: one 10-minute call). On the device machine, from the repo root, with .whl/ carried (bash
# ../shared/device/wheels.sh fills it here):
#   bash bench/gpu_checks.sh [path/to/gpu_anchor.py]      # results under $OUT (or gpu_out/), one file per check
#   bash bench/gpu_checks.sh --cpu                        # the CPU twin: the same scripts without --gpu (dry run)
# Record the JSON lines in docs/benchmarks.md with the device name.
set -uo pipefail
mode=gpu
if [ "${1:-}" = "--cpu" ]; then mode=cpu; shift; fi
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# the image's interpreter is python3 (there may be no `python`); the carried wheels go to /tmp/site, their entry
# scripts (deepspeed, ...) to /tmp/site/bin
PY=${PYTHON:-$(command -v python3 || command -v python)}
if [ "$mode" = gpu ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
flag=""; [ "$mode" = gpu ] && flag="--gpu"
{ [ "$mode" = gpu ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "mode $mode"; } \
  | tee "$out/device.txt"
"$PY" - <<'PY' 2>&1 | tail -1 | tee -a "$out/device.txt"
import importlib
print(" ".join(f"{m} {importlib.import_module(m).__version__}"
               for m in ("torch", "deepspeed", "transformers", "tokenizers", "datasets", "accelerate")))
PY
# 1. the anchor (baseline of every comparison), same machine, same call
if [ "$mode" = gpu ] && [ -n "${1:-}" ] && [ -f "$1" ]; then timeout 150 "$PY" "$1" 2>&1 | tee "$out/anchor.txt"; fi
# 2. fused vs plain KD loss at vocab 128256, 8192 tokens, hidden 2048, bf16 (+ Liger if installed)
timeout 150 "$PY" bench/kd_loss.py $flag --reps 10 2>&1 | tee "$out/kd_loss.txt"
# 3. one trainer step (ZeRO-3 student + ZeRO-3 teacher, fused head) vs naive KD at the anchor's shapes
timeout 150 "$PY" bench/train_step.py $flag 2>&1 | tee "$out/train_step.txt"
# 4. the GPU tests (bf16 ZeRO-3 distillation through the launcher, teacher offload); on CPU they skip
timeout 120 "$PY" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$out/pytest_gpu.txt"
