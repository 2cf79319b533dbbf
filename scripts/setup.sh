#!/usr/bin/env bash
# Create ./.venv and install tunelab with everything the demo and the test suite use.
# On a machine without an NVIDIA GPU the CPU build of PyTorch is installed first, because a plain `torch`
# requirement pulls a multi-GB CUDA build. Override with TORCH_SPEC (e.g. TORCH_SPEC=torch) and
# TORCH_INDEX_URL (a PyTorch wheel index) if you need another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q "${TORCH_SPEC:-torch}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  else
    .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
.venv/bin/pip install -q -e '.[all]'
echo "tunelab installed in .venv (activate with: source .venv/bin/activate)"
