#!/usr/bin/env bash
# Every GPU check of the project, for a session that is lent a GPU. Each part fits one 10-minute device call (every
# step has its own timeout); `all` does not: run the parts in order, one call each, recording each as it lands.
# On the device machine, from the repo root, with .whl/ carried (bash ../shared/device/wheels.sh fills it here):
#   bash bench/gpu_checks.sh [--part P] [path/to/gpu_anchor.py]   # results under $OUT (or gpu_out/), a file per check
#   bash bench/gpu_checks.sh --cpu [--part P]                     # the CPU twin: the same scripts without --gpu
# Parts, in issue 14's order, each under ten minutes: runs (the GPU tests, the fused head in bf16), right (train.py vs
# a plain-torch loop, 200 steps, alpha 0.2 and 0), fast (the anchor, the trainer's step vs naive KD, MFU against the
# measured matmul peak, the step per teacher placement), paper (the study's 1.7B / 0.7B pair at seq 8192,
# checkpointing on); all = every one.
# Record the JSON lines in docs/benchmarks.md with the device name.
set -uo pipefail
mode=gpu part=all
if [ "${1:-}" = "--cpu" ]; then mode=cpu; shift; fi
if [ "${1:-}" = "--part" ]; then part=$2; shift 2; fi
want() { [ "$part" = all ] || [ "$part" = "$1" ]; }
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
if want runs; then
  # the GPU tests (bf16 ZeRO-3 distillation through the launcher, teacher offload); on CPU they skip
  timeout 120 "$PY" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$out/pytest_gpu.txt"
  # fused vs plain KD loss at vocab 128256, 8192 tokens, hidden 2048, bf16 (+ Liger if installed)
  timeout 150 "$PY" bench/kd_loss.py $flag --reps 10 2>&1 | tee "$out/kd_loss.txt"
fi
if want right; then
  # train.py vs a plain-torch loop from the same init and batches (GPU: the paper's 1.7B / 0.7B pair on the offline
  # corpus packed in 2048-token rows, built here from the Python standard library in about a minute)
  data=data/offline seq=128; [ "$mode" = gpu ] && data=data/offline-2048 seq=2048
  [ -f "$data/index.json" ] || "$PY" -m data_prep.offline --out "$data" --vocab_size 2048 --seq_len $seq 2>&1 | tail -2
  timeout 360 "$PY" bench/reference_loop.py $flag --data "$data" 2>&1 | tee "$out/reference_loop.txt"
fi
if want fast; then
  # the anchor (baseline of every comparison), same machine, same call
  if [ "$mode" = gpu ] && [ -n "${1:-}" ] && [ -f "$1" ]; then timeout 150 "$PY" "$1" 2>&1 | tee "$out/anchor.txt"; fi
  # one trainer step (ZeRO-3 student + ZeRO-3 teacher, fused head) vs naive KD at the anchor's shapes
  timeout 150 "$PY" bench/train_step.py $flag 2>&1 | tee "$out/train_step.txt"
  # the same step with the teacher partitioned, replicated and offloaded (issue 22, distillery/placement.py)
  timeout 150 "$PY" bench/train_step.py $flag --placements 2>&1 | tee "$out/train_step_placement.txt"
fi
if want paper; then
  # the study's pair on one GPU: tokens/s, peak memory, MFU, hours for 50B tokens on 64 GPUs at this rate
  timeout 300 "$PY" bench/train_step.py $flag --paper 2>&1 | tee "$out/train_step_paper.txt"
fi
