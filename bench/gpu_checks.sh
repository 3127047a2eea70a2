#!/usr/bin/env bash
# Every GPU check of the project in one device call that ends within 330 s, wheel install included (issue 18).
# On the device machine, from the repo root, with .whl/ carried (bash ../shared/device/wheels.sh fills it here):
#   bash bench/gpu_checks.sh                          # all checks, in order: env, runs, right, fast, paper
#   bash bench/gpu_checks.sh right_reference paper    # rerun only what failed (a part name selects its checks)
#   bash bench/gpu_checks.sh --cpu                    # the CPU twin: the same checks at CPU shapes, within 300 s
#   python3 bench/gpu_checks.py --list                # the table of checks and their budgets
# One JSON line per check on stdout, each also in $OUT/<check>.json (+ checks.jsonl, <check>.log) the moment it
# ends ($OUT, else gpu_out/); the last line is the summary. The table, the deadline and the JSON lines are in
# bench/gpu_checks.py (its docstring says how to add a check: one row). Record the lines in docs/benchmarks.md.
t0=$(date +%s.%N)
cd "$(dirname "$0")/.." || exit 1
# the image's interpreter is python3 (there may be no `python`); here the venv's when there is one
PY=${PYTHON:-$( [ "${1:-}" = "--cpu" ] && [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || command -v python)}
exec "$PY" bench/gpu_checks.py --t0 "$t0" "$@"
