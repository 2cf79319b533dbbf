#!/usr/bin/env bash
# Issue 28's acceptance 2 on one GPU: tunelab against Unsloth on a model family's published shape, every side in
# its own process, one device call per shape (about 6 minutes on the Llama-2-7B shape):
#   bash bench/families.sh llama3-8b|qwen3-8b|gemma2-9b|qwen2.5-7b|llama2-7b
# Unsloth, bitsandbytes and their dependencies must be importable (PYTHONPATH; bench/RESULTS.md has the wheels).
# `@h`: every layer recomputed, its inputs kept on the host (what `tunelab train` does on a GPU by default).
set -uo pipefail
cd "$(dirname "$0")/.."
shape="${1:?usage: bash bench/families.sh SHAPE}"
timeout 570 python3 bench/speed.py --shape "$shape" --warmup 3 --steps 4 --timeout 130 --sides "\
lora2k=unsloth,lora2k=tunelab@h,qlora2k=unsloth_qlora,qlora2k=tunelab_qlora@h,qlora8k=unsloth_qlora,\
qlora8k=tunelab_qlora@h"
