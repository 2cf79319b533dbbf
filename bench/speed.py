"""LoRA/QLoRA training speed and memory: HF transformers + PEFT (+ bitsandbytes), Unsloth and tunelab on the
same model of a real model's shape (random weights; --shape, default Llama-2 7B), each side in its own process,
in one call.

    python bench/speed.py                       # every side at 2,048 tokens, then the table
    python bench/speed.py --cases qlora8k,long  # other cases (see CASES)
    python bench/speed.py --side tunelab --tokens 2048      # one side (what the driver runs per process)
    python bench/speed.py --sides "lora2k=unsloth,lora2k=tunelab@32h"   # exactly these case=side pairs
    python bench/speed.py --shape qwen3-8b      # llama2-7b (default), llama3-8b, qwen2.5-7b, qwen3-8b, gemma2-9b,
                                                # phi3.5-mini, phi4-mini

tunelab sides take `@N` (recompute only the first N layers) and `@Nh` (and keep their inputs on the host:
offload_checkpoints, which also sends the gate/up outputs of the layers FastDecoder.output_layers_for picks);
`@Nh-oK` sends those of K layers instead (`-o0`: none; for an A/B in one call), `@Nh-rK` keeps the inputs of
the top K recomputed layers on the GPU (decoder.RESIDENT_LAYERS), `@32h-a` leaves SwiGLU's backward to autograd
(not written in place); variants combine: `@32h-r0-a`. `hf@sdpa` and `hf_qlora@sdpa` load the model with sdpa
attention where the HF sides would take another (Gemma 2: eager, since sdpa skips its softcap in transformers
5.17), as transformers' default does there. bench/acceptance.sh runs the
issue's acceptance in three device calls. Diagnostics, with $OUT set: BENCH_PROFILE=1 (a kernel table and a
gzipped timeline, for bench/trace_gaps.py, of one more step; with BENCH_GRAPHS=0 the eager step's kernels, in
files named `-eager`), BENCH_MEMTRACE=1 (the allocations live at the peak, by source line; slows the steps).
Each result also holds the peak of every step, the layers whose gate/up outputs went to the host, and, for
graphed sides, the GPU time of the replayed graph (graph_ms) next to the wall time of a step (step_ms); the
table's last column is the host's time to launch one small kernel (launch_us), a rough gauge of the host that
eager sides' speed at 2,048 tokens depends on.

Every side: LoRA r=64, alpha=16, dropout 0 (`--dropout P`: P) on q/k/v/o/gate/up/down, activation
checkpointing (Unsloth: its own "unsloth" offloaded variant), fused AdamW, gradient clipping at 1.0, one
sequence per step, random token ids; tokens/s over the timed steps after warm-up (compilation happens in
warm-up), peak = the most memory allocated by PyTorch during warm-up and timed steps. The tunelab side runs
`tunelab.train.step.optimizer_step`, the very step `tunelab train` runs. The packed case draws real sample lengths
(bench/sample_lengths.json): the HF baseline pads each batch of 4 samples, tunelab packs them; tokens/s counts
real tokens only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Phi-3's fused projections, as PEFT names them: with Llama's names LoRA lands on o_proj and down_proj only,
# and tunelab takes the plain path (before 2026-12-06 the phi shapes ran that way)
FUSED_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
sys.path.insert(0, str(HERE))
from shape_model import SHAPES, build  # noqa: E402  (beside this script)
from sides import hf_attention, run_in_own_process  # noqa: E402

SHAPE_NAME = os.environ.get("BENCH_SHAPE", "llama2-7b")  # --shape; the driver hands it to each side's process
SHAPE = {"vocab_size": SHAPES[SHAPE_NAME][1]["vocab_size"]}  # what the sides read of it: the token ids drawn
# case -> (sides, tokens per step)
CASES = {
    "lora2k": (["hf", "unsloth", "tunelab"], 2048),
    "qlora2k": (["hf_qlora", "unsloth_qlora", "tunelab_qlora"], 2048),
    "qlora8k": (["hf_qlora", "unsloth_qlora", "tunelab_qlora"], 8192),
    "long": (["tunelab_qlora"], 32768),
    "packed": (["hf_padded", "tunelab_packed"], 0),
    # `tunelab train` itself (the CLI, in its own process) on packed 2,048-token rows: its logged tokens/s
    "train": (["tunelab_train", "tunelab_train_qlora"], 2048),
}


def _dropout() -> float:
    """LoRA dropout of every side (--dropout; the driver hands it to each side's process)."""
    return float(os.environ.get("BENCH_DROPOUT", "0"))


def make_model(path: Path) -> None:
    """A random model of the --shape (bench/shape_model.py) and a tokenizer, saved once for every side to load."""
    build(path, SHAPE_NAME, "cuda")


# -- one side, in its own process -------------------------------------------------------------------------
def targets(path: str) -> list[str]:
    """Every linear layer of the model's decoder, by the names its family uses."""
    model_type = json.loads(Path(path, "config.json").read_text()).get("model_type")
    return FUSED_TARGETS if model_type == "phi3" else TARGETS


def _hf_model(path: str, qlora: bool, attention: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if qlora else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": "cuda"},
                                                 attn_implementation=attention)
    model.config.use_cache = False
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=_dropout(),
                                             target_modules=targets(path), bias="none", task_type="CAUSAL_LM"))
    return model


def _unsloth_model(path: str, qlora: bool, tokens: int):
    import unsloth  # noqa: F401  (must come before transformers/peft: it patches them)
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=max(tokens, 2048), dtype=torch.bfloat16,
                                                 load_in_4bit=qlora, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=64, lora_alpha=16, lora_dropout=_dropout(), bias="none",
                                             target_modules=targets(path), use_gradient_checkpointing="unsloth",
                                             random_state=0)
    return model


def _hf_step(model, optimizer, params, ids, attention_mask=None, labels=None):
    import torch

    out = model(input_ids=ids, attention_mask=attention_mask, labels=ids if labels is None else labels,
                use_cache=False)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item()


def _tunelab_setup(path: str, qlora: bool, tokens: int, checkpoint_layers: int, offload: bool):
    import torch

    from tunelab.config.loader import load_config
    from tunelab.model.load import load_tokenizer
    from tunelab.train.setup import build_model

    values = dict(pretrained_model_name_or_path=path, algorithm="qlora" if qlora else "lora", lora_r=64,
                  lora_alpha=16, lora_dropout=_dropout(), lora_target_modules=targets(path),
                  max_length=max(tokens, 2048),
                  batch_size=1, accumulative_counts=1, max_norm=1.0, gradient_checkpointing=True,
                  checkpoint_layers=checkpoint_layers, offload_checkpoints=offload,
                  # BENCH_GRAPHS=0 for kernel-by-kernel profiles (BENCH_PROFILE=1) of the eager fast path
                  cuda_graphs=os.environ.get("BENCH_GRAPHS", "1") != "0")
    cfg = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])[0]
    model = build_model(cfg, path, "cuda", torch.bfloat16).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    return cfg, model, params, optimizer, load_tokenizer(path)


def launch_us() -> float:
    """The host's time to launch one tiny kernel (median of three rounds), in microseconds. Eager sides at
    2,048 tokens wait on the host's launches (Unsloth's GPU work was under half its step on one host), so
    their tokens/s depend on the host, which this figure gauges roughly; graphed sides replay one launch per
    step and do not."""
    import torch

    x = torch.zeros(16, device="cuda")
    rounds = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5000):
            x.add_(1)
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t) / 5000 * 1e6)
    return round(sorted(rounds)[1], 2)


def run_side(side: str, path: str, tokens: int, warmup: int, steps: int) -> dict:
    import torch

    from tunelab.data.dataset import Sequence, pack

    torch.manual_seed(0)
    # tunelab@N: recompute only the first N layers; tunelab@Nh: and keep their inputs on the host (offload)
    side, _, ckpt = side.partition("@")
    # hf@sdpa: the HF side with sdpa attention even where tunelab loads the model with another (Gemma 2: sdpa
    # skips its attention softcap in transformers 5.17), i.e. what a user of transformers' default gets
    attention = "sdpa" if side.startswith("hf") and ckpt == "sdpa" else None
    ckpt, _, variant = ckpt.partition("-")
    layers, offload = (-1, False) if attention else (int(ckpt.rstrip("h") or -1), ckpt.endswith("h"))
    variants = {part[:1]: part[1:] for part in variant.split("-") if part}  # A/B within one call, see above
    if "o" in variants:  # gate/up outputs of K layers on the host
        from tunelab.fast.decoder import FastDecoder
        pick, count = FastDecoder.output_layers_for, int(variants["o"])
        FastDecoder.output_layers_for = lambda self, tokens, _=None: pick(self, tokens, count)
    if "r" in variants:  # the top K recomputed layers keep their inputs on the GPU
        from tunelab.fast import decoder
        decoder.RESIDENT_LAYERS = int(variants["r"])
    ckpt += f"-{variant}" if variant else ""
    qlora = side.endswith("qlora")
    if side.startswith("tunelab_train"):
        return run_train(path, qlora, layers, offload, warmup, steps) | {"side": side + (f"@{ckpt}" if ckpt else "")}
    g = torch.Generator().manual_seed(0)
    batches_of_ids = [torch.randint(3, SHAPE["vocab_size"], (1, tokens), generator=g) for _ in range(warmup + steps)] \
        if tokens else []
    t_load = time.time()
    if side.startswith("tunelab"):
        from tunelab.train.step import optimizer_step
        cfg, model, params, optimizer, tokenizer = _tunelab_setup(path, qlora, tokens or 8192, layers, offload)
        if "a" in variants and getattr(model, "tunelab_fast", None) is not None:
            model.tunelab_fast.swiglu_backward_ = None  # A/B: autograd differentiates SwiGLU (not in place)

        def seq(ids):
            ids = ids.tolist()
            return Sequence(ids, ids[1:] + [-100], list(range(len(ids))), [0] * len(ids))

        if side == "tunelab_packed":
            samples = [seq(torch.randint(3, SHAPE["vocab_size"], (n,), generator=g)[None][0]) for n in _lengths()]
            rows = pack(samples, 8192)
            work = [[[row]] for row in rows]
            real = [len(r) for r in rows]
        else:
            work = [[[seq(ids[0])]] for ids in batches_of_ids]
            real = [tokens] * len(work)

        def step(i):
            loss, _, _ = optimizer_step(model, work[i], optimizer, params, cfg, tokenizer, torch.bfloat16, i)
            return loss
    else:
        model = _unsloth_model(path, qlora, tokens) if side.startswith("unsloth") else \
            _hf_model(path, qlora, attention or hf_attention(path))
        # from_pretrained leaves a model in eval mode, where HF and Unsloth skip gradient checkpointing (the
        # Trainer calls train() before the first step); before 2026-12-02 these sides ran that way
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
        if side == "hf_padded":
            lengths = _lengths()
            work, real = [], []
            for j in range(0, len(lengths), 4):
                group = lengths[j:j + 4]
                width = max(group)
                ids = torch.randint(3, SHAPE["vocab_size"], (len(group), width), generator=g)
                mask = torch.zeros(len(group), width, dtype=torch.long)
                for r, n in enumerate(group):
                    mask[r, :n] = 1
                labels = ids.masked_fill(mask == 0, -100)
                work.append((ids, mask, labels))
                real.append(sum(group))

            def step(i):
                ids, mask, labels = work[i]
                return _hf_step(model, optimizer, params, ids.cuda(), mask.cuda(), labels.cuda())
        else:
            real = [tokens] * len(batches_of_ids)

            def step(i):
                return _hf_step(model, optimizer, params, batches_of_ids[i].cuda())
    load_s = time.time() - t_load
    # the GPU time of each replayed graph: a step's time beyond it is work outside the graph (clipping, the
    # optimizer, the next batch's preparation) during which the GPU may wait
    replays: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    plain_replay = torch.cuda.CUDAGraph.replay

    def timed_replay(graph):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        plain_replay(graph)
        end.record()
        replays.append((start, end))

    torch.cuda.CUDAGraph.replay = timed_replay
    n_steps = len(real) if side in ("hf_padded", "tunelab_packed") else warmup + steps
    warm = warmup if side not in ("hf_padded", "tunelab_packed") else min(warmup, n_steps // 4)
    out_dir = os.environ.get("OUT")
    if os.environ.get("BENCH_MEMTRACE") and out_dir:  # what is allocated at the peak (see _memtrace)
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    losses, step_peaks = [], []
    for i in range(n_steps):
        if i == warm:
            torch.cuda.synchronize()
            t0, counted = time.time(), 0
        torch.cuda.reset_peak_memory_stats()  # per step: which one peaks (the first, eager; a capture; ...)
        losses.append(step(i))
        step_peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        if i >= warm:
            counted += real[i]
    torch.cuda.synchronize()
    elapsed = time.time() - t0
    torch.cuda.CUDAGraph.replay = plain_replay
    timed_replays = replays[-(n_steps - warm):]
    if os.environ.get("BENCH_MEMTRACE") and out_dir:
        Path(out_dir, f"memtrace_{side}{ckpt}.txt").write_text(_memtrace(torch.cuda.memory._snapshot()))
        torch.cuda.memory._record_memory_history(enabled=None)
    if os.environ.get("BENCH_PROFILE") and out_dir:  # one more step, kernel by kernel
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(n_steps - 1)
            torch.cuda.synchronize()
        averages = prof.key_averages()
        name = side + ckpt + ("-eager" if os.environ.get("BENCH_GRAPHS", "1") == "0" else "")
        trace = Path(out_dir, f"trace_{name}.json")  # the timeline, for bench/trace_gaps.py
        prof.export_chrome_trace(str(trace))
        subprocess.run(["gzip", "-f", str(trace)], check=False)
        Path(out_dir, f"profile_{name}.txt").write_text(
            averages.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60) + "\n\n" +
            averages.table(sort_by="self_cuda_time_total", row_limit=90, max_name_column_width=90))
    graphs, fast = getattr(model, "tunelab_graphs", None), getattr(model, "tunelab_fast", None)
    if side.startswith("tunelab") and fast is None:  # the log above says why; such a row measures the plain path
        print(f"{side}: the fast path failed to engage", flush=True)
    return dict(side=side + (f"@{ckpt}" if ckpt else ""), tokens=tokens, tok_s=counted / elapsed,
                training=model.training, output_layers=None if fast is None else fast.output_layers,
                cuda_graphs=None if graphs is None else dict(
                    captured=len(graphs.graphs), failed={str(k): v for k, v in graphs.failed.items()}),
                peak_gib=max(step_peaks), step_peaks_gib=[round(x, 3) for x in step_peaks],
                reserved_gib=torch.cuda.max_memory_reserved() / 2**30, steps=n_steps - warm,
                load_s=round(load_s, 1), first_loss=losses[0], last_loss=losses[-1],
                step_ms=round(1000 * elapsed / (n_steps - warm), 1),
                graph_ms=round(sum(a.elapsed_time(b) for a, b in timed_replays) / len(timed_replays), 1)
                if timed_replays else None)


def _memtrace(snapshot: dict) -> str:
    """The allocations live at the moment the most memory was allocated, from the allocator's trace
    (BENCH_MEMTRACE=1), summed by where they were made (the innermost tunelab/bench frame and the op)."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    freeing: set[int] = set()  # freed by PyTorch, not yet reusable (a block another stream used, a capture)
    freeing_at_peak = 0
    for event in snapshot["device_traces"][0]:
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "free_requested" and addr in live:
            freeing.add(addr)
        elif action == "alloc":
            frames = event.get("frames") or []
            ours = next((f for f in frames if "/tunelab/" in f["filename"] or "/bench/" in f["filename"]), None)
            where = f"{Path(ours['filename']).name}:{ours['line']} {ours['name']}" if ours else "?"
            top = f"{Path(frames[0]['filename']).name}:{frames[0]['name']}" if frames else "?"
            live[addr] = (size, f"{where} <- {top}")
            total += size
            if total > peak:
                peak, at_peak = total, dict(live)
                freeing_at_peak = sum(live[a][0] for a in freeing)
        elif action == "free_completed" and addr in live:
            total -= live.pop(addr)[0]
            freeing.discard(addr)
    by_place: dict[str, list[int]] = {}
    for size, place in at_peak.values():
        entry = by_place.setdefault(place, [0, 0])
        entry[0] += size
        entry[1] += 1
    lines = [f"peak of traced allocations: {peak / 2**30:.3f} GiB (allocations made before the trace began "
             f"are not in it); of it {freeing_at_peak / 2**30:.3f} GiB freed but not yet reusable",
             "GiB | count | where"]
    for place, (size, count) in sorted(by_place.items(), key=lambda kv: -kv[1][0])[:40]:
        lines.append(f"{size / 2**30:.4f} | {count} | {place}")
    return "\n".join(lines) + "\n"


def run_train(path: str, qlora: bool, checkpoint_layers: int, offload: bool, warmup: int, steps: int) -> dict:
    """`tunelab train` (the CLI, in a subprocess) on alpaca records of the real sample lengths (random
    words), packed into 2,048-token rows, the bench's LoRA settings; tokens/s as the run logged it, over
    the steps after warm-up."""
    import random
    import tempfile

    # packed rows meet a few sample-count buckets in their first steps, each captured once: count after them
    warmup, steps = max(warmup, 8), max(steps, 12)
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    rng = random.Random(0)
    vocab = ["alpha", "beta", "gamma", "delta", "patient", "dose", "answer", "question", "cell", "the", "of"]

    def text(chars: int) -> str:
        words = []
        while sum(len(w) + 1 for w in words) < chars:
            words.append(rng.choice(vocab))
        return " ".join(words)

    records = [{"instruction": text(n // 3), "input": "", "output": text(n - n // 3)} for n in _lengths() * 4]
    (work / "data.json").write_text(json.dumps(records))
    values = dict(pretrained_model_name_or_path=path, algorithm="qlora" if qlora else "lora",
                  data_path=str(work / "data.json"), prompt_template="internlm2_chat", max_length=2048,
                  pack_to_max_length=True, batch_size=1, accumulative_counts=1, max_steps=warmup + steps, lr=1e-5,
                  lora_r=64, lora_alpha=16, lora_dropout=_dropout(), lora_target_modules=targets(path), max_norm=1.0,
                  gradient_checkpointing=True, checkpoint_layers=checkpoint_layers, offload_checkpoints=offload,
                  torch_dtype="bf16",
                  evaluation_inputs=[], save_steps=10_000, log_interval=1)
    cfg = work / "bench_train.py"
    cfg.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--work-dir", str(work / "run")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tunelab train exited {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
    records = [json.loads(line) for f in (work / "run").glob("*/vis_data/scalars.json")
               for line in f.read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > warmup]
    notes = [line.strip()[-160:] for line in (proc.stdout + proc.stderr).splitlines()
             if "fast path" in line or "CUDA graph" in line]
    return dict(tokens=2048, tok_s=sum(r["tokens_per_s"] for r in timed) / len(timed),  # the mean logged rate
                per_step=[round(r["tokens_per_s"]) for r in records if "tokens_per_s" in r], notes=notes,
                peak_gib=max(r["memory_gb"] for r in records if "memory_gb" in r),
                steps=len(timed), first_loss=timed[0]["loss"], last_loss=timed[-1]["loss"])


def _lengths() -> list[int]:
    data = json.loads((HERE / "sample_lengths.json").read_text())
    return (data["medqa2019"] + data["alpaca"])[:480]


# -- the driver: every side in its own process, then the table ---------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--cases", default="lora2k,qlora2k")
    ap.add_argument("--only", default="", help="run only sides starting with this (e.g. tunelab)")
    ap.add_argument("--variants", default="", help="extra tunelab sides per case, e.g. lora2k=tunelab@0")
    ap.add_argument("--sides", default="", help="exactly these case=side pairs, in order (overrides --cases, "
                    "--only, --variants), e.g. lora2k=unsloth,lora2k=tunelab@9")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=SHAPE_NAME,
                    help="the model's published dimensions (bench/shape_model.py); default llama2-7b")
    ap.add_argument("--model-dir", default=os.environ.get("BENCH_MODEL_DIR"),
                    help="where the model is made once (default /tmp/<shape>_random)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=420)
    ap.add_argument("--dropout", type=float, default=None, help="LoRA dropout of every side (default 0)")
    args = ap.parse_args()
    os.environ["BENCH_SHAPE"] = args.shape
    if args.shape != SHAPE_NAME:
        SHAPE["vocab_size"] = SHAPES[args.shape][1]["vocab_size"]
        globals()["SHAPE_NAME"] = args.shape
    if args.model_dir is None:
        args.model_dir = "/tmp/llama2_7b_random" if args.shape in ("llama2-7b", "7b") else f"/tmp/{args.shape}_random"
    if args.dropout is not None:
        os.environ["BENCH_DROPOUT"] = str(args.dropout)
    if args.side:
        host = {"launch_us": launch_us()}  # measured before the side loads its model
        result = run_side(args.side, args.model_dir, args.tokens, args.warmup, args.steps) | host
        print("RESULT " + json.dumps(result), flush=True)
        return
    path = Path(args.model_dir)
    if not (path / "config.json").is_file():
        t = time.time()
        make_model(path)
        print(f"made {path} in {time.time() - t:.0f}s", flush=True)
    if args.sides:
        plan = [tuple(pair.split("=", 1)) for pair in args.sides.split(",")]
    else:
        plan = []
        for case in args.cases.split(","):
            extra = [v.split("=", 1)[1] for v in args.variants.split(",") if v.startswith(case + "=")]
            plan += [(case, side) for side in CASES[case][0] + extra if side.startswith(args.only)]
    rows = []
    for case, side in plan:
        tokens = CASES[case][1]
        cmd = [sys.executable, __file__, "--side", side, "--tokens", str(tokens), "--model-dir", str(path),
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
        t = time.time()
        result = run_in_own_process(cmd, args.timeout, f"{case}/{side}", side=side, tokens=tokens)
        result["case"] = case + (f" (dropout {_dropout():g})" if _dropout() else "")
        result["wall_s"] = round(time.time() - t)
        print(json.dumps(result), flush=True)
        rows.append(result)
    print(table(rows))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench.json").write_text(json.dumps(rows, indent=1))


def table(rows: list[dict]) -> str:
    lines = ["| case | side | tokens | tokens/s | peak GiB | reserved GiB | vs HF | vs Unsloth | loss first->last "
             "| launch us |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["side"]] = r
    for case, sides in by_case.items():
        ref_hf = next((r for s, r in sides.items() if s.startswith("hf") and "tok_s" in r), None)
        ref_us = next((r for s, r in sides.items() if s.startswith("unsloth") and "tok_s" in r), None)
        for side, r in sides.items():
            if "tok_s" not in r:
                lines.append(f"| {case} | {side} | {r['tokens']} | failed: {r.get('error', '')} | | | | | | |")
                continue
            vs = lambda ref: f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"  # noqa: E731
            reserved = f"{r['reserved_gib']:.2f}" if "reserved_gib" in r else "-"
            lines.append(f"| {case} | {side} | {r['tokens'] or 'real'} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | "
                         f"{reserved} | {vs(ref_hf)} | {vs(ref_us)} | {r['first_loss']:.3f}->{r['last_loss']:.3f} | "
                         f"{r.get('launch_us', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
