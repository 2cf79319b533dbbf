"""`tunelab train`: the training loop, top to bottom.

config -> tokenizer -> data (fail fast, before the model loads) -> model (+LoRA / 4-bit) -> AdamW with
warmup + cosine -> steps of `accumulative_counts` micro-batches, the loss averaged over every target token
of the step -> checkpoints, logs, evaluation answers -> the adapter (or model) in Hugging Face format.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.checkpoint import save_checkpoint
from tunelab.config.loader import render_config
from tunelab.config.schema import Config, to_dict
from tunelab.data.dataset import Sequence, attention_bias, build_sequences, collate
from tunelab.data.encode import IGNORE, PromptFormat
from tunelab.data.formats import Turn
from tunelab.errors import ConfigError
from tunelab.model.generate import Sampling, generate
from tunelab.model.load import (add_lora, default_device, load_model, load_tokenizer, resolve_dtype,
                                resolve_model_path)

log = logging.getLogger("tunelab")


@dataclass
class TrainResult:
    work_dir: Path
    model: object      # the trained model (PEFT-wrapped for LoRA/QLoRA)
    tokenizer: object
    steps: int


@dataclass
class RunDirs:
    root: Path      # work_dirs/<name>
    stamp: Path     # work_dirs/<name>/<timestamp>
    scalars: Path   # .../vis_data/scalars.json
    log_handler: logging.Handler


def prepare_work_dir(cfg: Config, name: str, work_dir: str | None) -> RunDirs:
    """The SPEC section 6 layout, a file log, and copies of the resolved config."""
    root = Path(work_dir) if work_dir else Path("work_dirs") / name
    stamp_name = time.strftime("%Y%m%d_%H%M%S")
    stamp = root / stamp_name
    (stamp / "vis_data").mkdir(parents=True, exist_ok=True)
    config_text = render_config(to_dict(cfg), name)
    (root / f"{name}.py").write_text(config_text, encoding="utf-8")
    (stamp / "vis_data" / "config.py").write_text(config_text, encoding="utf-8")
    handler = logging.FileHandler(stamp / f"{stamp_name}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
    log.addHandler(handler)
    return RunDirs(root, stamp, stamp / "vis_data" / "scalars.json", handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warmup to the peak, then cosine decay to zero (XTuner's LinearLR + CosineAnnealingLR)."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def token_losses(model, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per-token cross entropy (0 where the target is ignored), shape (batch, seq)."""
    device = next(p for p in model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=attention_bias(batch["segment_ids"], dtype), use_cache=False)
    logits = out.logits.float()
    losses = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE,
                             reduction="none")
    return losses.view(batch["targets"].shape)


def build_model(cfg: Config, model_path: str, device: str, dtype: torch.dtype):
    """The model to train: full weights, or a frozen (4-bit for QLoRA) base with LoRA adapters."""
    bits = 4 if cfg.algorithm == "qlora" else None
    weights_dtype = torch.float32 if cfg.algorithm == "full" or device == "cpu" else dtype
    model = load_model(model_path, dtype=weights_dtype, bits=bits, device=device,
                       trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.algorithm in ("lora", "qlora"):
        model = add_lora(model, cfg, quantized=bits is not None)
    return model


def trainable_state(model, algorithm: str) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: the adapter in PEFT's file layout, or every weight for full tuning."""
    if algorithm == "full":
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def evaluate(model, tokenizer, fmt: PromptFormat, cfg: Config, step: int, dirs: RunDirs) -> list[dict]:
    """Answer cfg.evaluation_inputs greedily; log them and append them to eval_answers.jsonl."""
    answers = []
    for question in cfg.evaluation_inputs:
        ids, _ = fmt.encode([Turn(question, "")], open_last=True)
        answer = generate(model, tokenizer, ids, fmt.stop_words,
                          Sampling(max_new_tokens=cfg.evaluation_max_new_tokens, temperature=0))
        log.info("eval step %d | %s -> %s", step, question, answer)
        answers.append({"step": step, "input": question, "output": answer})
    if answers:
        with open(dirs.stamp / "eval_answers.jsonl", "a", encoding="utf-8") as f:
            for a in answers:
                f.write(json.dumps(a, ensure_ascii=False) + "\n")
    return answers


def train(cfg: Config, name: str, work_dir: str | None = None, seed: int | None = None) -> TrainResult:
    """Run a whole training job."""
    if seed is not None:
        cfg.seed = seed
    seed_everything(cfg.seed)

    # Data first: bad data must fail in seconds, not after a 7B model has loaded.
    model_path = resolve_model_path(cfg.pretrained_model_name_or_path)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    sequences, stats = build_sequences(cfg, tokenizer)
    if cfg.batch_size > len(sequences):
        raise ConfigError(f"'batch_size' {cfg.batch_size} is larger than the dataset ({len(sequences)} "
                          f"sequences after packing); lower batch_size")
    fmt = PromptFormat(tokenizer, cfg.prompt_template, cfg.SYSTEM)

    dirs = prepare_work_dir(cfg, name, work_dir)
    try:
        return _run(cfg, name, dirs, model_path, tokenizer, sequences, stats, fmt)
    finally:
        log.removeHandler(dirs.log_handler)
        dirs.log_handler.close()


def _run(cfg: Config, name: str, dirs: RunDirs, model_path: str, tokenizer, sequences: list[Sequence], stats,
         fmt: PromptFormat) -> TrainResult:
    log.info("config %s | model %s | algorithm %s", name, model_path, cfg.algorithm)
    log.info(stats.summary())
    if stats.skipped > stats.records // 10:
        log.warning("warning: %d of %d samples were dropped (no answer within max_length=%d or a bad record); "
                    "raise max_length if that is not intended", stats.skipped, stats.records, cfg.max_length)

    device = default_device()
    dtype = resolve_dtype(cfg.torch_dtype, device)
    model = build_model(cfg, model_path, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    log.info("trainable parameters: %d of %d", sum(p.numel() for p in params),
             sum(p.numel() for p in model.parameters()))

    micro_per_epoch = math.ceil(len(sequences) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.accumulative_counts)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.max_epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.warmup_ratio))
    log.info("%d sequences, %d steps per epoch, %d steps in all", len(sequences), steps_per_epoch, total_steps)

    model.train()
    evaluate(model, tokenizer, fmt, cfg, 0, dirs)
    step, started = 0, time.time()
    for epoch in range(1, epochs + 1):
        order = list(range(len(sequences)))
        if cfg.shuffle:
            random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        micro = [[sequences[i] for i in order[j:j + cfg.batch_size]] for j in range(0, len(order), cfg.batch_size)]
        for first in range(0, len(micro), cfg.accumulative_counts):
            window = micro[first:first + cfg.accumulative_counts]
            loss, tokens, t0 = _optimizer_step(model, window, optimizer, params, cfg, tokenizer, dtype)
            scheduler.step()
            step += 1
            if step % cfg.log_interval == 0 or step == total_steps or step == 1:
                record = {"step": step, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
                          "tokens_per_s": tokens / max(time.time() - t0, 1e-9), "memory_gb": _memory_gb(),
                          "time": round(time.time() - started, 3)}
                with open(dirs.scalars, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                log.info("epoch %d step %d/%d | loss %.4f | lr %.3g | %.0f tok/s", epoch, step, total_steps,
                         loss, record["lr"], record["tokens_per_s"])
            if cfg.evaluation_inputs and step % cfg.evaluation_freq == 0 and step < total_steps:
                evaluate(model, tokenizer, fmt, cfg, step, dirs)
            if cfg.save_steps and step % cfg.save_steps == 0:
                _save(model, optimizer, scheduler, cfg, dirs, f"iter_{step}.pth", step, epoch)
            if step >= total_steps:
                break
        if not cfg.save_steps:
            _save(model, optimizer, scheduler, cfg, dirs, f"epoch_{epoch}.pth", step, epoch)
        if step >= total_steps:
            break
    if cfg.save_steps and step % cfg.save_steps:  # the final weights are always in a checkpoint
        _save(model, optimizer, scheduler, cfg, dirs, f"iter_{step}.pth", step, epoch)
    evaluate(model, tokenizer, fmt, cfg, step, dirs)
    from tunelab.convert import export_trained

    export_trained(model, tokenizer, cfg, dirs.root / "hf")
    log.info("done: %d steps in %.1fs; adapter/model in %s", step, time.time() - started, dirs.root / "hf")
    return TrainResult(dirs.root, model, tokenizer, step)


def _optimizer_step(model, window: list[list[Sequence]], optimizer, params, cfg: Config, tokenizer,
                    dtype) -> tuple[float, int, float]:
    """One optimizer step over a window of micro-batches; the loss is the mean over all its target tokens."""
    t0 = time.time()
    n_targets = sum(s.n_targets for batch in window for s in batch)
    n_tokens = sum(len(s) for batch in window for s in batch)
    total = 0.0
    for batch in window:
        losses = token_losses(model, collate(batch, tokenizer.pad_token_id), dtype)
        loss = losses.sum() / n_targets
        loss.backward()
        total += loss.item()
    if cfg.max_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, n_tokens, t0


def _memory_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def _save(model, optimizer, scheduler, cfg: Config, dirs: RunDirs, filename: str, step: int, epoch: int) -> None:
    state = {
        "meta": {"step": step, "epoch": epoch, "algorithm": cfg.algorithm, "tunelab_format": 1},
        "config": to_dict(cfg),
        "model": trainable_state(model, cfg.algorithm),
        "peft_config": _peft_config(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    path = save_checkpoint(dirs.root, filename, state, cfg.save_total_limit)
    log.info("saved checkpoint %s", path)


def _peft_config(model) -> dict | None:
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    d = config.to_dict()
    d["target_modules"] = sorted(d["target_modules"]) if isinstance(d.get("target_modules"), (set, list)) else d.get("target_modules")
    return d
