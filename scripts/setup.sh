#!/usr/bin/env bash
# Create .venv with everything Distillery needs (idempotent). Only Python and the package index are required.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch alone first: DeepSpeed's setup.py imports torch, and with build isolation pip would fetch a second,
# multi-GB CUDA torch just to build it.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "$(grep '^torch==' requirements.txt)"
grep -v '^torch==' requirements.txt | grep -v '^deepspeed' > .venv/reqs-rest.txt
$PIP install -q -r .venv/reqs-rest.txt
# DS_BUILD_OPS=0: pure-Python install; CUDA/C++ ops compile on first use where they are needed.
.venv/bin/python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "$(grep '^deepspeed' requirements.txt)"
if [ "${WITH_LM_EVAL:-1}" = 1 ] && [ -f requirements-eval.txt ]; then $PIP install -q -r requirements-eval.txt; fi
.venv/bin/python -c "import torch, deepspeed, transformers; print(f'setup ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')" 2>&1 | grep -v Warning | tail -1
