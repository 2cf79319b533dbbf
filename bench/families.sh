#!/usr/bin/env bash
# Issue 28's acceptance 2 on one GPU: tunelab against Unsloth on a model family's published shape, every side in
# its own process, one device call per shape (about 6 minutes on the Llama-2-7B shape):
#   bash bench/families.sh llama3-8b|qwen3-8b|gemma2-9b|qwen2.5-7b|llama2-7b [unsloth|hf]
# The second argument picks the baseline: Unsloth (the default), or HF + PEFT (+ bitsandbytes) where Unsloth
# cannot run the shape (the acceptance then asks for 2x). Unsloth, bitsandbytes and their dependencies must be
# importable (PYTHONPATH; bench/RESULTS.md has the wheels).
# `@h`: every layer recomputed, its inputs kept on the host (what `tunelab train` does on a GPU by default).
set -uo pipefail
cd "$(dirname "$0")/.."
shape="${1:?usage: bash bench/families.sh SHAPE [unsloth|hf]}"
case "${2:-unsloth}" in
  unsloth) lora=unsloth; qlora=unsloth_qlora ;;
  hf) lora=hf; qlora=hf_qlora ;;
  *) echo "baseline must be unsloth or hf" >&2; exit 2 ;;
esac
timeout 570 python3 bench/speed.py --shape "$shape" --warmup 3 --steps 4 --timeout 130 --sides "\
lora2k=$lora,lora2k=tunelab@h,qlora2k=$qlora,qlora2k=tunelab_qlora@h,qlora8k=$qlora,qlora8k=tunelab_qlora@h"
