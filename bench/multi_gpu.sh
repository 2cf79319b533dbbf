#!/usr/bin/env bash
# Several-GPU figures (issue 6, acceptance 2) on one host with 2 GPUs:
#   1. LoRA on the 7B shape: tokens/s on 1 GPU vs NPROC_PER_NODE=2 (DDP); the goal is >= 1.85x.
#   2. Full fine-tuning of the 7B shape: 1 GPU (expected to run out of memory), FSDP2 on 2 GPUs, and
#      DeepSpeed ZeRO-3 on 2 GPUs (when deepspeed is installed).
# Full fine-tuning runs stop after a few steps through the kill_after_step fault (tunelab/faults.py), so that
# no 80+ GB full checkpoint is written; the figures come from each run's vis_data/scalars.json.
# Usage: bash bench/multi_gpu.sh [OUT_DIR]     (PY=path/to/python to use another interpreter;
#        SHAPE=tiny checks the script itself on a CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/tunelab_bench}
PY=${PY:-.venv/bin/python}
SHAPE=${SHAPE:-7b}
MODEL=$OUT/llama-$SHAPE-shape
mkdir -p "$OUT"
[ -f "$MODEL/config.json" ] || "$PY" bench/shape_model.py "$MODEL" --shape "$SHAPE" || exit 1

# synthetic alpaca records, enough for the runs below once packed into 2048-token sequences
"$PY" - "$OUT/data.jsonl" <<'PYEOF'
import json, random, sys
rng = random.Random(0)
words = "the model learns a small task from data and answers questions about science history and code".split()
with open(sys.argv[1], "w") as f:
    for i in range(3000):
        text = lambda n: " ".join(rng.choice(words) for _ in range(n))
        f.write(json.dumps({"instruction": text(40), "input": "", "output": text(200)}) + "\n")
PYEOF

cat > "$OUT/lora.py" <<PYEOF
pretrained_model_name_or_path = '$MODEL'
algorithm = 'lora'
data_path = '$OUT/data.jsonl'
prompt_template = 'llama2_chat'
max_length = 2048
pack_to_max_length = True
batch_size = 2
accumulative_counts = 1
max_steps = 30
lr = 1e-4
lora_r = 64
lora_alpha = 16
gradient_checkpointing = True
torch_dtype = 'auto'
log_interval = 1
evaluation_inputs = []
PYEOF
sed -e "s/^algorithm = .*/algorithm = 'full'/" -e "s/^batch_size = .*/batch_size = 1/" -e "s/^lr = .*/lr = 1e-5/" \
    "$OUT/lora.py" > "$OUT/full.py"

run() {  # name, then env assignments and tunelab arguments
    local name=$1; shift
    echo "== $name: $*"
    rm -rf "${OUT:?}/$name"
    env "$@" --work-dir "$OUT/$name" > "$OUT/$name.log" 2>&1
    echo "   exit code $? (log: $OUT/$name.log)"
}
run lora_1gpu CUDA_VISIBLE_DEVICES=0 "$PY" -m tunelab train "$OUT/lora.py"
run lora_2gpu NPROC_PER_NODE=2 "$PY" -m tunelab train "$OUT/lora.py"
run full_1gpu CUDA_VISIBLE_DEVICES=0 TUNELAB_FAULT=kill_after_step=8 PYTHONPATH="$PWD/tests/faults:${PYTHONPATH:-}" "$PY" -m tunelab train "$OUT/full.py"
run full_fsdp2 NPROC_PER_NODE=2 TUNELAB_FAULT=kill_after_step=8 PYTHONPATH="$PWD/tests/faults:${PYTHONPATH:-}" "$PY" -m tunelab train "$OUT/full.py"
if "$PY" -c "import deepspeed" 2>/dev/null; then
    run full_zero3 NPROC_PER_NODE=2 TUNELAB_FAULT=kill_after_step=8 PYTHONPATH="$PWD/tests/faults:${PYTHONPATH:-}" "$PY" -m tunelab train "$OUT/full.py" \
        --deepspeed deepspeed_zero3
else
    echo "== full_zero3: skipped, deepspeed is not installed (pip install 'tunelab[deepspeed]')"
fi

"$PY" - "$OUT" <<'PYEOF'
import glob, json, statistics, sys
out = sys.argv[1]
print(f"\n| run | steps | median tokens/s (steps > 3) | peak GiB (rank 0) | last loss |\n| --- | --- | --- | --- | --- |")
rates = {}
for name in ["lora_1gpu", "lora_2gpu", "full_1gpu", "full_fsdp2", "full_zero3"]:
    rows = [json.loads(l) for f in glob.glob(f"{out}/{name}/*/vis_data/scalars.json") for l in open(f)]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        print(f"| {name} | 0 | - | - | - (see {name}.log) |")
        continue
    rate = statistics.median(r["tokens_per_s"] for r in rows if r["step"] > 3) if len(rows) > 3 else float("nan")
    rates[name] = rate
    print(f"| {name} | {len(rows)} | {rate:.0f} | {max(r['memory_gb'] for r in rows):.1f} | {rows[-1]['loss']:.4f} |")
if "lora_1gpu" in rates and "lora_2gpu" in rates:
    print(f"\nLoRA speed-up, 2 GPUs over 1: {rates['lora_2gpu'] / rates['lora_1gpu']:.2f}x (goal >= 1.85x)")
PYEOF
