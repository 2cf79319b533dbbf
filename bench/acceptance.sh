#!/usr/bin/env bash
# Issue 5's acceptance on one GPU, in three parts that each fit one device call (at most 10 minutes):
#   bash bench/acceptance.sh 1   # GPU numerics tests; LoRA and QLoRA at 2,048 and 8,192 tokens (points 6, 1-3)
#   bash bench/acceptance.sh 2   # packed real lengths against padded HF (point 4)
#   bash bench/acceptance.sh 3   # `tunelab train` against the bench step; 32,768 tokens (points 5, 3)
# Every side runs in its own process (bench/speed.py); the baselines run with gradient checkpointing on, as
# the issue asks. Unsloth, bitsandbytes and their dependencies must be importable (PYTHONPATH). `@32h`: all
# 32 layers recomputed, their inputs kept on the host (offload_checkpoints).
set -uo pipefail
cd "$(dirname "$0")/.."
speed=(python3 bench/speed.py --warmup 3 --steps 4)  # timeout runs commands, not shell functions
case "${1:-}" in
  1)
    # 20 GPU tests, mostly compiling: 130-150 s on the machines seen (2026-12-03)
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fast.py -k gpu > "${OUT:-/tmp}/gpu_tests.txt" 2>&1
    tail -4 "${OUT:-/tmp}/gpu_tests.txt"
    timeout 385 "${speed[@]}" --timeout 100 --sides "lora2k=unsloth,lora2k=tunelab@32h,\
qlora2k=unsloth_qlora,qlora2k=tunelab_qlora@32h,qlora8k=unsloth_qlora,qlora8k=tunelab_qlora@32h" ;;
  2)
    timeout 560 "${speed[@]}" --timeout 240 --sides "packed=hf_padded,packed=tunelab_packed@0" ;;
  3)
    timeout 560 "${speed[@]}" --timeout 180 --sides "lora2k=tunelab@32h,train=tunelab_train@32h,long=tunelab_qlora@32h" ;;
  *)
    echo "usage: bash bench/acceptance.sh 1|2|3" >&2
    exit 2 ;;
esac
