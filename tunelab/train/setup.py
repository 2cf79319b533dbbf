"""What a run is built from, one function each, in the order train() calls them: the tokenizer, the data, the
checkpoint to resume from, the model (with its engine), the optimizer and the schedule."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import time
from pathlib import Path

import torch

from tunelab.config.schema import Config
from tunelab.data.dataset import Sequence, build_sequences, pack
from tunelab.data.preference import build_units
from tunelab.data.template_fit import check_template_fit
from tunelab.errors import ConfigError, UserError
from tunelab.model.load import add_lora, load_model, load_tokenizer, resolve_model_path
from tunelab.model.state import load_trainable_state
from tunelab.train import engines
from tunelab.train.checkpoint import find_resume_checkpoint
from tunelab.train.processes import Context
from tunelab.train.token_cache import tokenise_once

log = logging.getLogger("tunelab")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def setup_tokenizer(cfg: Config):
    """(model path, tokenizer, template fit). Another family's format on this model stops here, before a work
    dir or a cache exists (data/template_fit.py)."""
    model_path = resolve_model_path(cfg.pretrained_model_name_or_path)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    fit = check_template_fit(tokenizer, cfg.prompt_template, cfg.pretrained_model_name_or_path,
                             cfg.prompt_template_check)
    return model_path, tokenizer, fit


def setup_data(cfg: Config, tokenizer, ctx: Context, model_path: str, root: Path):
    """(training sequences, validation sequences, data stats), tokenised once per node."""
    sequences, val, stats = tokenise_once(ctx, cfg, model_path, root, lambda: load_training_data(cfg, tokenizer))
    if cfg.batch_size * ctx.world_size > len(sequences):
        processes = f" x {ctx.world_size} processes" if ctx.world_size > 1 else ""
        raise ConfigError(f"'batch_size' {cfg.batch_size}{processes} is larger than the dataset ({len(sequences)} "
                          f"sequences after packing); lower batch_size")
    return sequences, val, stats


def load_training_data(cfg: Config, tokenizer) -> tuple[list[Sequence], list[Sequence], object]:
    """(training sequences, validation sequences, data stats). Validation data come from
    evaluation_data_path, or from a seeded validation_split of the samples (held out before packing). A
    preference objective's samples are units of two answers (data/preference.py)."""
    build = build_sequences if cfg.objective == "sft" else build_units
    if not cfg.validation_split or cfg.evaluation_data_path:
        sequences, stats = build(cfg, tokenizer)
        val: list[Sequence] = []
        if cfg.evaluation_data_path:
            val, val_stats = build(dataclasses.replace(cfg, data_path=cfg.evaluation_data_path), tokenizer)
            log.info("validation %s", val_stats.summary())
        return sequences, val, stats
    samples, stats = build(dataclasses.replace(cfg, pack_to_max_length=False), tokenizer)
    order = list(range(len(samples)))
    random.Random(cfg.seed + 1).shuffle(order)
    n_val = max(1, round(len(samples) * cfg.validation_split))
    if n_val >= len(samples):
        raise ConfigError(f"'validation_split' {cfg.validation_split} leaves no training data "
                          f"({len(samples)} samples); lower it")
    held = set(order[:n_val])
    val = [s for i, s in enumerate(samples) if i in held]
    sequences = [s for i, s in enumerate(samples) if i not in held]
    if cfg.pack_to_max_length:
        random.Random(cfg.seed).shuffle(sequences)
        sequences = pack(sequences, cfg.max_length)
    stats.sequences = len(sequences)
    return sequences, val, stats


def data_fingerprint(sequences: list[Sequence]) -> str:
    """Identifies the tokenised data, so a resume notices when the data changed underneath it."""
    h = hashlib.sha256()
    for s in sequences:
        h.update(len(s).to_bytes(4, "little"))
        h.update(bytes(str(s.input_ids[:16]), "ascii"))
    return h.hexdigest()[:16]


def find_checkpoint(cfg: Config, root: Path, resume: str | None) -> tuple[Path, dict] | None:
    """The checkpoint to resume from: --resume ('auto' or a path) or auto_resume; None to start afresh."""
    resume = resume or ("auto" if cfg.auto_resume else None)
    if not resume:
        return None
    found = find_resume_checkpoint(root, None if resume == "auto" else resume, log)
    if found is None and not cfg.auto_resume:
        if not any(root.glob("*/vis_data")):  # no run was ever started there: a wrong --work-dir, say
            raise UserError(f"--resume: no checkpoint in {root} to resume from; train without --resume first")
        log.info("--resume: the run in %s stopped before its first checkpoint; training from the start", root)
    return found


def build_model(cfg: Config, model_path: str, device: str, dtype: torch.dtype, engine: str = "single",
                world_size: int = 1):
    """The model to train: full weights, or a frozen (4-bit for QLoRA) base with LoRA adapters; `engine`
    (engines.choose) and `world_size` decide whether the fast path can run and with CUDA graphs."""
    from tunelab import fast

    bits = 4 if cfg.algorithm == "qlora" else None
    fast.lean_cublas(cfg, device)  # before anything runs on the GPU
    weights_dtype = torch.float32 if cfg.algorithm == "full" or device == "cpu" else dtype
    model = load_model(model_path, dtype=weights_dtype, bits=bits, device=device,
                       trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False
    want_fast = fast.use_fast_path(cfg, device, model, engine)
    if cfg.gradient_checkpointing and not want_fast:  # the fast path checkpoints its own layers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.algorithm in ("lora", "qlora"):
        # the fast path needs no fp32 copies of norms/embeddings/head (prepare_model_for_kbit_training)
        model = add_lora(model, cfg, quantized=bits is not None, prepare=not want_fast, model_path=model_path)
    if want_fast:
        fast.attach(model, cfg, device, world_size)
    return model


def setup_model(cfg: Config, ctx: Context, model_path: str, dtype: torch.dtype, deepspeed: dict | None,
                checkpoint: tuple[Path, dict] | None, fingerprint: str, root: Path):
    """(model, engine): the model built where its engine wants it, the checkpoint's weights loaded before the
    engine wraps, shards or partitions it."""
    kind = engines.choose(ctx, cfg, deepspeed)
    model = build_model(cfg, model_path, engines.load_device(kind, cfg, ctx.device, deepspeed), dtype, kind,
                        ctx.world_size)
    if checkpoint is not None:
        load_weights(checkpoint[1], model, cfg, fingerprint)
    engine = engines.wrap(ctx, model, cfg, dtype, deepspeed, root)
    log.info("trainable parameters: %d of %d", sum(p.numel() for p in model.parameters() if p.requires_grad),
             sum(p.numel() for p in model.parameters()))
    return model, engine


def setup_reference(cfg: Config, objective, model, rows: list[Sequence], tokenizer, dtype: torch.dtype,
                    checkpoint: tuple[Path, dict] | None) -> list | None:
    """DPO/KTO: every answer's log-prob under the reference (the base with the adapter off, or under full
    fine-tuning the model as the run starts), computed once, or taken from the checkpoint resumed; None for the
    other objectives. Returns them per row, for the checkpoints."""
    if not objective.needs_reference:
        return None
    saved = checkpoint[1].get("reference") if checkpoint is not None else None
    if saved is not None and len(saved) == len(rows):
        for row, reference in zip(rows, saved):
            row.reference = reference
    else:
        if checkpoint is not None and cfg.algorithm == "full":
            log.warning("warning: the checkpoint holds no reference log-probs for these data; the reference is "
                        "the resumed model, not the one the run started from")
        started = time.time()
        objective.reference(model, rows, cfg.batch_size, tokenizer.pad_token_id, dtype)
        log.info("reference log-probs of %d rows in %.1fs", len(rows), time.time() - started)
    return [row.reference for row in rows]


def setup_optimizer(cfg: Config, model, engine):
    """(AdamW over the trainable parameters, those parameters), made by the engine (DeepSpeed owns its own)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return engine.make_optimizer(params, cfg), params


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warmup to the peak, then cosine decay to zero (XTuner's LinearLR + CosineAnnealingLR)."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def setup_scheduler(cfg: Config, optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.warmup_ratio))


def load_weights(state: dict, model, cfg: Config, fingerprint: str) -> None:
    meta = state["meta"]
    if meta["algorithm"] != cfg.algorithm:
        raise UserError(f"the checkpoint is from a '{meta['algorithm']}' run but the config says algorithm = "
                        f"'{cfg.algorithm}'; resume with the config it was trained with")
    if meta.get("data") != fingerprint:
        log.warning("warning: the data differ from the checkpoint's; the resumed run will not match the "
                    "original exactly")
    load_trainable_state(model, cfg.algorithm, state["model"])
    if state.get("initial_adapter") and getattr(model, "tunelab_initial_adapter", None) is not None:
        _use_checkpoints_start(model, state["initial_adapter"])


@torch.no_grad()
def _use_checkpoints_start(model, start: dict[str, torch.Tensor]) -> None:
    """PiSSA/OLoRA: put the base back to the residual the run trained on, W - s B0 A0 with the checkpoint's
    B0 A0. This run's own start can differ (a randomised SVD, singular vectors of another device or library)."""
    from peft.tuners.lora import LoraLayer

    ours = model.tunelab_initial_adapter
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        key = f"{name}.lora_"  # PEFT's file layout, as tunelab_initial_adapter holds it
        weight, scale = module.get_base_layer().weight, module.scaling["default"]
        then = start[key + "B.weight"].float() @ start[key + "A.weight"].float()
        now = ours[key + "B.weight"].float() @ ours[key + "A.weight"].float()
        weight.add_((scale * (now - then)).to(weight))
    model.tunelab_initial_adapter = {k: v.clone() for k, v in start.items()}


def restore(state: dict, engine, optimizer, scheduler, ctx: Context) -> int:
    """Optimizer, schedule and random state (the weights are in already); returns the step."""
    engine.load_optimizer(engine.module, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if state.get("rng_ranks") and len(state["rng_ranks"]) == ctx.world_size:
        rng = state["rng_ranks"][ctx.rank]  # each rank's own dropout stream
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["meta"]["step"])
