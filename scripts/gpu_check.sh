#!/usr/bin/env bash
# The checks that need a GPU, in one call (issue 16): the CUDA tests, the GPU throughput benchmark (clean
# and every method, with and without gradient checkpointing), the per-method cost against pass counts
# (FreeAT's and YOPO's overhead), and every notebook in fast mode on the GPU. Each writes its own file
# under OUT, plus summary.txt with one exit status per check. CI never runs this (it has no GPU).
#
#   bash scripts/gpu_check.sh [OUT]          # OUT defaults to $OUT, else ./gpu_check
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
#
# Needs a Python with a CUDA build of torch and vlat's dependencies (pip install -e ".[dev]").
set -u
OUT="${1:-${OUT:-gpu_check}}"
PY="${PYTHON:-$(command -v .venv/bin/python || command -v python3)}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"

check() {   # check NAME COMMAND...: run it, keep its output, note its exit status
    local name="$1"
    shift
    local t0=$SECONDS
    "$@" > "$OUT/$name.txt" 2>&1
    echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$summary"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi: not found" >> "$summary"
"$PY" -c "import torch, vlat; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| vlat', vlat.__version__)" | tee -a "$summary"
export GRADIO_ANALYTICS_ENABLED=False
check test_cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
check gpu_throughput "$PY" benchmarks/gpu_throughput.py
check gpu_throughput_ckpt "$PY" benchmarks/gpu_throughput.py --grad-checkpointing --methods FreeAT,YOPO,FreeLB
check methods_cost "$PY" benchmarks/methods_cost.py --model single_stream --preset tiny --site image
check notebooks "$PY" -m pytest -q -p no:cacheprovider tests/test_notebooks.py -k fast_mode
cat "$summary"
