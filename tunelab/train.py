"""`tunelab train`: the training loop, top to bottom.

config -> tokenizer -> data (fail fast, before the model loads) -> model (+LoRA / 4-bit) -> AdamW with
warmup + cosine -> optimizer steps of `accumulative_counts` micro-batches, the loss averaged over every
target token of the step -> checkpoints, logs, evaluation -> the adapter (or model) in Hugging Face format.

A run can be left alone: it resumes exactly (weights, optimizer, scheduler, data position, RNG), saves a
checkpoint on Ctrl-C/SIGTERM, skips non-finite steps and stops after `max_bad_steps` of them in a row.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab import distributed, parallel
from tunelab.checkpoint import (find_resume_checkpoint, refuse_existing_run, remove_stale_temp_files,
                                save_checkpoint)
from tunelab.config.loader import render_config
from tunelab.config.schema import Config, to_dict
from tunelab.data.dataset import Sequence, build_sequences, collate, pack
from tunelab.data.encode import PromptFormat
from tunelab.data.template_fit import check_template_fit
from tunelab.data.formats import Turn
from tunelab.errors import ConfigError, TrainingInterrupted, TrainingStopped, UserError
from tunelab.model.generate import Sampling, generate
from tunelab.model.load import (add_lora, load_model, load_tokenizer, resolve_dtype,
                                resolve_model_path)
from tunelab.model.losses import token_losses
from tunelab.step import epoch_windows
from tunelab.model.save import export_trained
from tunelab.model.state import load_trainable_state, peft_config_dict
from tunelab.monitor import RunMonitor

log = logging.getLogger("tunelab")


@dataclass
class TrainResult:
    work_dir: Path
    model: object      # the trained model (PEFT-wrapped for LoRA/QLoRA)
    tokenizer: object
    steps: int


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


def build_model(cfg: Config, model_path: str, device: str, dtype: torch.dtype):
    """The model to train: full weights, or a frozen (4-bit for QLoRA) base with LoRA adapters."""
    from tunelab import fast

    bits = 4 if cfg.algorithm == "qlora" else None
    fast.lean_cublas(cfg, device)  # before anything runs on the GPU
    weights_dtype = torch.float32 if cfg.algorithm == "full" or device == "cpu" else dtype
    model = load_model(model_path, dtype=weights_dtype, bits=bits, device=device,
                       trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False
    want_fast = fast.use_fast_path(cfg, device, model)
    if cfg.gradient_checkpointing and not want_fast:  # the fast path checkpoints its own layers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.algorithm in ("lora", "qlora"):
        # the fast path needs no fp32 copies of norms/embeddings/head (prepare_model_for_kbit_training)
        model = add_lora(model, cfg, quantized=bits is not None, prepare=not want_fast, model_path=model_path)
    if want_fast:
        fast.attach(model, cfg, device)
    return model


def data_fingerprint(sequences: list[Sequence]) -> str:
    """Identifies the tokenised data, so a resume notices when the data changed underneath it."""
    h = hashlib.sha256()
    for s in sequences:
        h.update(len(s).to_bytes(4, "little"))
        h.update(bytes(str(s.input_ids[:16]), "ascii"))
    return h.hexdigest()[:16]


def evaluate(model, tokenizer, fmt: PromptFormat, cfg: Config, step: int, monitor: RunMonitor,
             val: list[Sequence], dtype) -> None:
    """Answer cfg.evaluation_inputs greedily (to the log and eval_answers.jsonl); measure the validation loss."""
    answers = []
    for question in cfg.evaluation_inputs:
        ids, _ = fmt.encode([Turn(question, "")], open_last=True)
        answer = generate(model, tokenizer, ids, fmt.stop_words,
                          Sampling(max_new_tokens=cfg.evaluation_max_new_tokens, temperature=0))
        log.info("eval step %d | %s -> %s", step, question, answer)
        answers.append({"step": step, "input": question, "output": answer})
    if answers:
        monitor.eval_answers(answers)
    if val:
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(val), cfg.batch_size):
                losses = token_losses(model, collate(val[i:i + cfg.batch_size], tokenizer.pad_token_id), dtype)
                total += losses.sum().item()
                count += sum(s.n_targets for s in val[i:i + cfg.batch_size])
        model.train(was_training)
        monitor.scalars({"step": step, "val_loss": total / max(count, 1)})


def load_training_data(cfg: Config, tokenizer) -> tuple[list[Sequence], list[Sequence], object]:
    """(training sequences, validation sequences, data stats). Validation data come from
    evaluation_data_path, or from a seeded validation_split of the samples (held out before packing)."""
    if not cfg.validation_split or cfg.evaluation_data_path:
        sequences, stats = build_sequences(cfg, tokenizer)
        val: list[Sequence] = []
        if cfg.evaluation_data_path:
            val, val_stats = build_sequences(dataclasses.replace(cfg, data_path=cfg.evaluation_data_path), tokenizer)
            log.info("validation %s", val_stats.summary())
        return sequences, val, stats
    samples, stats = build_sequences(dataclasses.replace(cfg, pack_to_max_length=False), tokenizer)
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


def train(cfg: Config, name: str, work_dir: str | None = None, seed: int | None = None,
          resume: str | None = None, deepspeed: dict | None = None) -> TrainResult:
    """Run a whole training job. resume: 'auto' (newest checkpoint), a .pth path, or None. Under torchrun
    this is one rank of a data-parallel job (tunelab/parallel.py); deepspeed: a DeepSpeed config dict."""
    ctx = distributed.setup(need_group=deepspeed is not None)
    try:
        result = _train(cfg, name, work_dir, seed, resume, ctx, deepspeed)
    except BaseException:
        distributed.teardown(ctx)
        raise
    distributed.teardown(ctx, finished=True)
    return result


def _train(cfg: Config, name: str, work_dir: str | None, seed: int | None, resume: str | None,
           ctx: distributed.Context, deepspeed: dict | None) -> TrainResult:
    if seed is not None:  # --seed: a new Config, the loaded one stays as it was
        cfg = dataclasses.replace(cfg, seed=seed)
    seed_everything(cfg.seed)

    # Data first: bad data must fail in seconds, not after a 7B model has loaded.
    model_path = resolve_model_path(cfg.pretrained_model_name_or_path)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    # another family's format on this model stops here, before a work dir or a cache exists; the verdict is
    # logged with the run's first lines, so that an input error found on the way stays the only line
    fit = check_template_fit(tokenizer, cfg.prompt_template, cfg.pretrained_model_name_or_path,
                             cfg.prompt_template_check)
    root = Path(work_dir) if work_dir else Path("work_dirs") / name
    if not (resume or cfg.auto_resume):
        refuse_existing_run(root)
    sequences, val, stats = distributed.tokenise_once(ctx, cfg, model_path, root,
                                                      lambda: load_training_data(cfg, tokenizer))
    if cfg.batch_size * ctx.world_size > len(sequences):
        processes = f" x {ctx.world_size} processes" if ctx.world_size > 1 else ""
        raise ConfigError(f"'batch_size' {cfg.batch_size}{processes} is larger than the dataset ({len(sequences)} "
                          f"sequences after packing); lower batch_size")
    fmt = PromptFormat(tokenizer, cfg.prompt_template, cfg.SYSTEM)
    resume = resume or ("auto" if cfg.auto_resume else None)
    checkpoint = None
    if resume:
        found = find_resume_checkpoint(root, None if resume == "auto" else resume, log)
        if found is None and not cfg.auto_resume:
            if not any(root.glob("*/vis_data")):  # no run was ever started there: a wrong --work-dir, say
                raise UserError(f"--resume: no checkpoint in {root} to resume from; train without --resume first")
            log.info("--resume: the run in %s stopped before its first checkpoint; training from the start", root)
        checkpoint = found

    micro_per_epoch = math.ceil(len(sequences) / (cfg.batch_size * ctx.world_size))  # global micro-batches
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.accumulative_counts)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.max_epochs
    root.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:  # run files and checkpoints come from rank 0 only
        remove_stale_temp_files(root)
    monitor_type = RunMonitor if ctx.is_main else distributed.NullMonitor
    monitor = monitor_type(root, total_steps, cfg.log_interval, render_config(to_dict(cfg), name), name)
    try:
        (log.warning if fit.verdict == "conflict" else log.info)(fit.message)
        return _run(cfg, name, root, model_path, tokenizer, sequences, val, stats, fmt, monitor, checkpoint,
                    steps_per_epoch, total_steps, ctx, deepspeed)
    finally:
        monitor.close()


def _run(cfg, name, root, model_path, tokenizer, sequences, val, stats, fmt, monitor: RunMonitor, checkpoint,
         steps_per_epoch: int, total_steps: int, ctx: distributed.Context, deepspeed: dict | None) -> TrainResult:
    log.info("config %s | model %s | algorithm %s", name, model_path, cfg.algorithm)
    log.info(stats.summary())
    if stats.skipped > stats.records // 10:
        log.warning("warning: %d of %d samples were dropped (no answer within max_length=%d or a bad record); "
                    "raise max_length if that is not intended", stats.skipped, stats.records, cfg.max_length)
    device = ctx.device
    dtype = resolve_dtype(cfg.torch_dtype, device)
    kind = parallel.choose(ctx, cfg, deepspeed)
    model = build_model(cfg, model_path, parallel.load_device(kind, cfg, device, deepspeed), dtype)
    fingerprint = data_fingerprint(sequences)
    if checkpoint is not None:  # the weights go in before an engine wraps, shards or partitions the model
        _load_weights(checkpoint[1], model, cfg, fingerprint)
    par = parallel.wrap(ctx, model, cfg, dtype, deepspeed, root)
    params = [p for p in model.parameters() if p.requires_grad]
    log.info("trainable parameters: %d of %d", sum(p.numel() for p in params),
             sum(p.numel() for p in model.parameters()))
    optimizer = par.make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.warmup_ratio))
    log.info("%d sequences, %d steps per epoch, %d steps in all", len(sequences), steps_per_epoch, total_steps)

    step = 0
    if checkpoint is not None:
        path, state = checkpoint
        step = _restore(state, par, optimizer, scheduler, ctx)
        log.info("resumed from %s at step %d", path, step)
    monitor.set_position(step)

    def export() -> None:
    
        weights, _ = par.state(model, None, cfg.algorithm, None)  # on every rank
        if ctx.is_main:
            export_trained(model, tokenizer, cfg, root / "hf", weights)

    if step >= total_steps:  # resumed from the final checkpoint: only the export may be missing
        done = (root / "hf").is_dir()  # written whole or not at all (fsutil.atomic_dir)
        log.info("the run is complete (step %d of %d)%s", step, total_steps,
                 f"; its adapter/model is in {root / 'hf'}" if done else "; writing its adapter/model")
        if not done:
            export()
            log.info("adapter/model in %s", root / "hf")
        return TrainResult(root, model, tokenizer, step)

    def save(filename: str, epoch: int) -> Path | None:
        weights, optimizer_state = par.state(model, optimizer, cfg.algorithm, filename)  # on every rank
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        rng_ranks = distributed.all_gather_objects(ctx, rng) if ctx.world_size > 1 else None
        if not ctx.is_main:
            return None
        state = {
            "meta": {"step": step, "epoch": epoch, "algorithm": cfg.algorithm, "data": fingerprint,
                     "tunelab_format": 1, "world_size": ctx.world_size},
            "config": to_dict(cfg), "model": weights,
            "peft_config": peft_config_dict(model), "optimizer": optimizer_state,
            "initial_adapter": getattr(model, "tunelab_initial_adapter", None),  # PiSSA/OLoRA: for the export
            "scheduler": scheduler.state_dict(), "rng": rng, "rng_ranks": rng_ranks,
        }
        path = save_checkpoint(root, filename, state, cfg.save_total_limit)
        log.info("saved checkpoint %s", path)
        monitor.plot()
        return path

    stop_signal: list[int] = []
    handlers = _catch_signals(stop_signal)
    try:
        model.train()
        if step == 0:
            evaluate(model, tokenizer, fmt, cfg, 0, monitor, val, dtype)
        bad_in_a_row, started = 0, time.time()
        first_epoch = step // steps_per_epoch + 1
        for epoch in range(first_epoch, math.ceil(total_steps / steps_per_epoch) + 1):
            windows = epoch_windows(sequences, cfg, epoch, ctx.world_size)
            for index, window in enumerate(windows):
                if (epoch - 1) * steps_per_epoch + index < step:
                    continue  # done before the resume
                loss, tokens, seconds = par.optimizer_step(window, optimizer, params, cfg, tokenizer, dtype, step + 1,
                                                           stop_signal)
                scheduler.step()
                step += 1
                if loss is None:
                    bad_in_a_row += 1
                    log.warning("warning: step %d skipped: non-finite loss or gradient (%d in a row)", step,
                                bad_in_a_row)
                    if bad_in_a_row >= cfg.max_bad_steps:
                        pointer = root / "last_checkpoint"
                        last = pointer.read_text().strip() if pointer.exists() else "none"
                        raise TrainingStopped(
                            f"training stopped at step {step}: {bad_in_a_row} steps in a row had a non-finite "
                            f"loss or gradient; last good checkpoint: {last}; lower lr or check the data")
                else:
                    bad_in_a_row = 0
                    monitor.step({"step": step, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
                                  "tokens_per_s": tokens / max(seconds, 1e-9), "memory_gb": _memory_gb(),
                                  "time": round(time.time() - started, 3)})
                if stop_signal:
                    path = save(f"iter_{step}.pth", epoch)
                    signame = "SIGINT" if stop_signal[0] == signal.SIGINT else "SIGTERM"
                    raise TrainingInterrupted(f"{signame} at step {step}: checkpoint saved to {path}; continue "
                                              f"with `tunelab train ... --resume`", 128 + stop_signal[0])
                if step < total_steps and step % cfg.evaluation_freq == 0:
                    evaluate(model, tokenizer, fmt, cfg, step, monitor, val, dtype)
                if cfg.save_steps and step % cfg.save_steps == 0 and not bad_in_a_row:
                    save(f"iter_{step}.pth", epoch)
                if step >= total_steps:
                    break
            if not cfg.save_steps and (step == epoch * steps_per_epoch or step >= total_steps):
                # a max_steps stop mid-epoch is no whole epoch: name that checkpoint by its step
                save(f"epoch_{epoch}.pth" if step == epoch * steps_per_epoch else f"iter_{step}.pth", epoch)
            if step >= total_steps:
                break
        if cfg.save_steps and step % cfg.save_steps:  # the final weights are always in a checkpoint
            save(f"iter_{step}.pth", epoch)
        evaluate(model, tokenizer, fmt, cfg, step, monitor, val, dtype)
    finally:
        _restore_signals(handlers)
    export()
    monitor.plot()
    log.info("done: %d steps; adapter/model in %s", step, root / "hf")
    return TrainResult(root, model, tokenizer, step)


def _load_weights(state: dict, model, cfg: Config, fingerprint: str) -> None:
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


def _restore(state: dict, par, optimizer, scheduler, ctx: distributed.Context) -> int:
    """Optimizer, schedule and random state (the weights are in already); returns the step."""
    par.load_optimizer(par.module, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if state.get("rng_ranks") and len(state["rng_ranks"]) == ctx.world_size:
        rng = state["rng_ranks"][ctx.rank]  # each rank's own dropout stream
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["meta"]["step"])


def _catch_signals(stop: list[int]):
    """On SIGINT/SIGTERM, finish the current step, save, and stop (a second signal stops at once)."""
    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        log.warning("%s received: saving a checkpoint after this step (again to abort)",
                    signal.Signals(signum).name)
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return previous


def _restore_signals(previous) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _memory_gb() -> float:
    """The progress line's `mem`: peak GPU memory allocated, or on a CPU the process's resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30
