#!/usr/bin/env bash
# Set up vlat in ./.venv (the README's setup command): bash scripts/setup.sh
#
# Where no NVIDIA GPU is visible, torch is installed first as the CPU build pinned below, so that
# the unpinned "torch>=..." of pyproject.toml is already satisfied and pip does not pull a
# multi-GB CUDA build. Override the spec with VLAT_TORCH (e.g. VLAT_TORCH="torch==2.9.1"); on a
# machine without a local CPU wheel, point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: no NVIDIA GPU found: installing the CPU build of torch (${VLAT_TORCH:-torch==2.13.0})"
  $PIP install -q "${VLAT_TORCH:-torch==2.13.0}"
fi
$PIP install -q -e ".[dev]"
.venv/bin/python -c "import torch, transformers, vlat; print(f'setup: vlat {vlat.__version__}, torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}')"
