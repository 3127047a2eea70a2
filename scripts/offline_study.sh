#!/usr/bin/env bash
# The study in miniature, on CPU, offline (README command 1): build the corpus and tokenizer, train a small
# under-trained teacher, distill a larger student from it, train the student's alpha = 0 baseline, print the table.
# Extra arguments are config overrides for all three runs (e.g. alpha=0.4). Rerunning resumes / skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Hide DeepSpeed's INFO lines and known-harmless warnings; `|| true`: grep exits 1 when it hides every line.
quiet() { grep --line-buffered -v -e '^\[20..-..-.. ..:..:..,...\] \[INFO\]' -e 'return func(\*args' \
  -e 'Setting accelerator to CPU' -e 'Loading weights' -e 'FutureWarning' -e 'shm_comm_op built' || true; }
[ -f data/offline/index.json ] || python -m data_prep.offline --out data/offline --vocab_size 2048 --seq_len 128
# A free port for DeepSpeed's rendezvous, so the study runs next to other jobs (the default 29500 may be taken).
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
for run in teacher student_kd student_baseline; do
  deepspeed --num_gpus 1 --master_port "$port" train.py --ds_config ds_configs/cpu.json --config "configs/offline/$run.yaml" "$@" 2>&1 | quiet
done
python scripts/summarize.py runs/offline-student-baseline runs/offline-student-kd --plot runs/offline-study.png
# The paper's logit analysis (entropy, KL, agreement, by baseline-entropy bin) on the out-of-domain English set.
python -m eval.logit_analysis --student runs/offline-student-kd --baseline runs/offline-student-baseline \
  --teacher runs/offline-teacher --set ood_english --window 256 --max_windows 64 \
  --out runs/offline-logit-analysis.json --plot runs/offline-logit-analysis.png 2>&1 | quiet
python - <<'PY'
import json
d = json.load(open("runs/offline-logit-analysis.json"))
print(f"logit analysis (ood_english, {d['tokens']} tokens): student - baseline entropy "
      f"{d['entropy']['student_minus_baseline']:+.4f} nats, PPL change {d['ppl']['student_change_pct_vs_baseline']:+.2f}%, "
      f"top-1 agreement with teacher {d['vs_teacher']['top1_agreement']:.3f}; "
      f"runs/offline-logit-analysis.json and .png")
PY
