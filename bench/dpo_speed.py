"""DPO training speed and memory: TRL's DPOTrainer + PEFT (+ bitsandbytes for QLoRA) against tunelab, on the same
model of a real model's shape (random weights; --shape, default Llama-3 8B, bench/shape_model.py), each side in its
own process, in one call, then one table.

    python bench/dpo_speed.py                         # QLoRA, 2,048-token pairs: TRL, tunelab, tunelab@0; the table
    python bench/dpo_speed.py --pair-tokens 4096      # longer pairs
    python bench/dpo_speed.py --sides trl,tunelab,tunelab@0,tunelab-eager   # no layer recomputed; no CUDA graphs
    python bench/dpo_speed.py --shape tiny --algorithm lora --warmup 1 --steps 2    # the script itself, on a CPU

A pair is one random prompt (a quarter of each sequence) with a chosen and a rejected random answer, the two
sequences together --pair-tokens long; one pair per optimizer step. Every side: LoRA r=64, alpha=16, dropout 0 on
q/k/v/o/gate/up/down, sigmoid DPO with beta 0.1, activation checkpointing, fused AdamW, gradient clipping at 1.0,
the reference being the base with the adapter off (tunelab@N: only the first N layers recomputed). TRL computes the reference in every step (its default);
tunelab computes it once before training (`tunelab train` does), and the timed pairs' share of it (after a pass
over the warm-up pairs, which compiles) is added to its steps' time, so tokens/s compare the same work. tokens/s count both sequences of every timed pair; peak = the most memory
PyTorch allocated over warm-up and timed steps (on a CPU, the process's resident memory).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
sys.path.insert(0, str(HERE))
from shape_model import SHAPES, build  # noqa: E402  (beside this script)
from sides import hf_attention, run_in_own_process  # noqa: E402


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _pairs(n: int, pair_tokens: int, vocab: int) -> list[tuple[list[int], list[int], list[int]]]:
    """n random (prompt, chosen, rejected) token lists: each sequence pair_tokens // 2 long, a quarter prompt."""
    import torch

    g = torch.Generator().manual_seed(0)
    seq = pair_tokens // 2
    prompt = seq // 4
    draw = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [(draw(prompt), draw(seq - prompt), draw(seq - prompt)) for _ in range(n)]


def _peak_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _trl_side(path: str, qlora: bool, pairs, warmup: int) -> tuple[list[float], float]:
    """TRL's DPOTrainer over a PEFT model (4-bit through bitsandbytes for QLoRA): its own loss, one pair a step."""
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype) if qlora else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant,
                                                 device_map={"": _device()},
                                                 attn_implementation=hf_attention(path))
    args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], bf16=cuda, use_cpu=not cuda, beta=0.1,
                     loss_type=["sigmoid"], gradient_checkpointing=True, per_device_train_batch_size=1)
    trainer = DPOTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(path),
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2),
                         peft_config=LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    model = trainer.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda or None)
    losses, t0 = [], time.time()
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        if i == warmup:
            _sync()
            t0 = time.time()
        ids = torch.tensor([prompt + chosen, prompt + rejected], device=_device())
        completion = torch.tensor([[0] * len(prompt) + [1] * len(chosen)] * 2, device=_device())
        loss = trainer._compute_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                             "completion_mask": completion}, False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    _sync()
    return losses, time.time() - t0


def _tunelab_side(path: str, qlora: bool, pairs, warmup: int, recomputed: int = -1,
                  graphs: bool = True) -> tuple[list[float], float]:
    """`tunelab train`'s own step (train/step.optimizer_step) with objective dpo, and its reference pass;
    `recomputed`: checkpoint_layers (-1: every layer), `graphs`: cuda_graphs."""
    import torch

    from tunelab.config.loader import load_config
    from tunelab.data.dataset import Sequence, join
    from tunelab.data.encode import IGNORE
    from tunelab.data.preference import CHOSEN, REJECTED
    from tunelab.model.load import load_tokenizer
    from tunelab.train.objective import make_objective
    from tunelab.train.setup import build_model
    from tunelab.train.step import optimizer_step

    device = _device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    seq = len(pairs[0][0]) + len(pairs[0][1])
    values = dict(pretrained_model_name_or_path=path, algorithm="qlora" if qlora else "lora", objective="dpo",
                  pref_beta=0.1, lora_r=64, lora_alpha=16, lora_dropout=0.0, lora_target_modules=TARGETS,
                  max_length=2 * seq, batch_size=1, accumulative_counts=1, max_norm=1.0, gradient_checkpointing=True,
                  checkpoint_layers=recomputed, cuda_graphs=graphs)
    cfg = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])[0]
    model = build_model(cfg, path, device, dtype).train()
    tokenizer = load_tokenizer(path)

    def segment(prompt, answer, kind):
        ids = prompt + answer
        targets = [IGNORE] * (len(prompt) - 1) + answer + [IGNORE]
        return Sequence(ids, targets, list(range(len(ids))), [0] * len(ids), [kind])

    units = [join([segment(p, c, CHOSEN), segment(p, r, REJECTED)]) for p, c, r in pairs]
    objective = make_objective(cfg)
    # the reference pass compiles its own (no-grad) regions on its first pairs: warmed up like the steps, and
    # only the timed pairs' share counted
    objective.reference(model, units[:warmup], 1, tokenizer.pad_token_id, dtype)
    _sync()
    t_ref = time.time()
    objective.reference(model, units[warmup:], 1, tokenizer.pad_token_id, dtype)
    _sync()
    reference_s = time.time() - t_ref
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda" or None)
    losses, t0 = [], time.time()
    for i, unit in enumerate(units):
        if i == warmup:
            _sync()
            t0 = time.time()
        loss, _, _ = optimizer_step(model, [[unit]], optimizer, params, cfg, tokenizer, dtype, i + 1, objective)
        losses.append(loss)
    _sync()
    return losses, time.time() - t0 + reference_s


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_side(side: str, path: str, algorithm: str, pair_tokens: int, warmup: int, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    pairs = _pairs(warmup + steps, pair_tokens, vocab)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if side == "trl":
        losses, seconds = _trl_side(path, algorithm == "qlora", pairs, warmup)
    else:  # tunelab, tunelab@N (N layers recomputed), tunelab-eager (no CUDA graphs)
        recomputed = int(side.split("@")[1]) if "@" in side else -1
        losses, seconds = _tunelab_side(path, algorithm == "qlora", pairs, warmup, recomputed,
                                        graphs=not side.endswith("-eager"))
    return dict(side=side, algorithm=algorithm, pair_tokens=pair_tokens, tok_s=round(steps * pair_tokens / seconds, 1),
                peak_gib=round(_peak_gib(), 2), first_loss=losses[0], last_loss=losses[-1])


# -- the driver: each side in its own process, then the table ------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", help="trl, tunelab, tunelab@N (N layers recomputed) or tunelab-eager (no CUDA graphs)")
    ap.add_argument("--sides", default="trl,tunelab,tunelab@0")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--algorithm", choices=["qlora", "lora"], default="qlora")
    ap.add_argument("--pair-tokens", type=int, default=2048, help="chosen and rejected sequences together")
    ap.add_argument("--model-dir", help="where the model is made once (default /tmp/<shape>_random)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=540)
    args = ap.parse_args()
    path = Path(args.model_dir or f"/tmp/{args.shape}_random")
    if args.side:
        result = run_side(args.side, str(path), args.algorithm, args.pair_tokens, args.warmup, args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if not (path / "config.json").is_file():
        build(path, args.shape, _device())
    rows = []
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, "--side", side, "--model-dir", str(path), "--algorithm", args.algorithm,
               "--pair-tokens", str(args.pair_tokens), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        result = run_in_own_process(cmd, args.timeout, side, side=side)
        print(json.dumps(result), flush=True)
        rows.append(result)
    print(table(rows, args))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "dpo_speed.json").write_text(json.dumps(rows, indent=1))


def table(rows: list[dict], args) -> str:
    trl = next((r for r in rows if r["side"] == "trl" and "tok_s" in r), None)
    lines = [f"DPO, {args.algorithm}, {args.shape}, {args.pair_tokens}-token pairs",
             "| side | tokens/s | peak GiB | vs TRL (speed) | vs TRL (memory) | loss first->last |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "tok_s" not in r:
            lines.append(f"| {r['side']} | failed: {r.get('error', '')} | | | | |")
            continue
        speed = f"{r['tok_s'] / trl['tok_s']:.2f}x" if trl else "-"
        memory = f"{r['peak_gib'] / trl['peak_gib']:.2f}x" if trl else "-"
        lines.append(f"| {r['side']} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | {speed} | {memory} | "
                     f"{r['first_loss']:.4f}->{r['last_loss']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
