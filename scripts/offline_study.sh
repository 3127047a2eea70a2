#!/usr/bin/env bash
# The study in miniature, on CPU, offline (README command 1): build the corpus and tokenizer, train a small
# under-trained teacher, distill a larger student from it, train the student's alpha = 0 baseline, print the table.
# Extra arguments are config overrides for all three runs (e.g. alpha=0.4). Rerunning resumes / skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
[ -f data/offline/index.json ] || python -m data_prep.offline --out data/offline --vocab_size 2048 --seq_len 128
for run in teacher student_kd student_baseline; do
  deepspeed --num_gpus 1 train.py --ds_config ds_configs/cpu.json --config "configs/offline/$run.yaml" "$@" 2>&1 \
    | grep --line-buffered -v -e '^\[20..-..-.. ..:..:..,...\] \[INFO\]' -e 'return func(\*args' -e 'Setting accelerator to CPU'
done
python scripts/summarize.py runs/offline-student-baseline runs/offline-student-kd --plot runs/offline-study.png
