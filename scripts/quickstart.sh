#!/usr/bin/env bash
# One command from a fresh clone: install, fine-tune the built-in demo, and ask the result "who are you".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf work_dirs/demo  # a work dir holds one run (tunelab refuses to start another there); the demo starts afresh
.venv/bin/tunelab train demo
printf 'who are you\nRESET\n你是谁\n' | .venv/bin/tunelab chat work_dirs/demo/hf --temperature 0
