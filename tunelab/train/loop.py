"""`tunelab train`: the training loop, top to bottom.

config -> tokenizer -> data (fail fast, before the model loads) -> model (+LoRA / 4-bit) and its engine -> AdamW
with warmup + cosine -> optimizer steps of `accumulative_counts` micro-batches, the loss averaged over every
target token of the step -> checkpoints, logs, evaluation -> the adapter (or model) in Hugging Face format.

A run can be left alone: it resumes exactly (weights, optimizer, scheduler, data position, RNG), saves a
checkpoint on Ctrl-C/SIGTERM, skips non-finite steps and stops after `max_bad_steps` of them in a row.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config.loader import render_config
from tunelab.config.schema import Config, to_dict
from tunelab.data.encode import PromptFormat
from tunelab.errors import TrainingInterrupted, TrainingStopped
from tunelab.model.load import resolve_dtype
from tunelab.model.save import export_trained
from tunelab.model.state import peft_config_dict
from tunelab.train import processes
from tunelab.train.checkpoint import refuse_existing_run, remove_stale_temp_files, save_checkpoint
from tunelab.train.evaluate import evaluate
from tunelab.train.monitor import RunMonitor
from tunelab.train.setup import (data_fingerprint, find_checkpoint, restore, seed_everything, setup_data,
                                 setup_model, setup_optimizer, setup_reference, setup_scheduler, setup_tokenizer)
from tunelab.train.step import epoch_windows

log = logging.getLogger("tunelab")


@dataclass
class TrainResult:
    work_dir: Path
    model: object      # the trained model (PEFT-wrapped for LoRA/QLoRA)
    tokenizer: object
    steps: int


def train(cfg: Config, name: str, work_dir: str | None = None, seed: int | None = None,
          resume: str | None = None, deepspeed: dict | None = None) -> TrainResult:
    """Run a whole training job. resume: 'auto' (newest checkpoint), a .pth path, or None. Under torchrun
    this is one rank of a data-parallel job (engines.py); deepspeed: a DeepSpeed config dict."""
    ctx = processes.setup(need_group=deepspeed is not None)
    try:
        result = _train(cfg, name, work_dir, seed, resume, ctx, deepspeed)
    except BaseException:
        processes.teardown(ctx)
        raise
    processes.teardown(ctx, finished=True)
    return result


@dataclass
class Run:
    """What the loop trains with, once set up."""
    cfg: Config
    ctx: processes.Context
    root: Path
    model: object
    engine: object
    optimizer: torch.optim.Optimizer
    params: list
    scheduler: object
    tokenizer: object
    fmt: PromptFormat
    monitor: RunMonitor
    dtype: torch.dtype
    fingerprint: str
    reference: list | None = None  # DPO/KTO: each row's reference log-probs, kept in every checkpoint

    def save(self, filename: str, step: int, epoch: int) -> Path | None:
        cfg, ctx = self.cfg, self.ctx
        weights, optimizer_state = self.engine.state(self.model, self.optimizer, cfg.algorithm, filename)  # every rank
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        rng_ranks = processes.all_gather_objects(ctx, rng) if ctx.world_size > 1 else None
        if not ctx.is_main:
            return None
        state = {
            "meta": {"step": step, "epoch": epoch, "algorithm": cfg.algorithm, "data": self.fingerprint,
                     "tunelab_format": 1, "world_size": ctx.world_size},
            "config": to_dict(cfg), "model": weights,
            "peft_config": peft_config_dict(self.model), "optimizer": optimizer_state,
            "initial_adapter": getattr(self.model, "tunelab_initial_adapter", None),  # PiSSA/OLoRA: for the export
            "scheduler": self.scheduler.state_dict(), "rng": rng, "rng_ranks": rng_ranks,
            "reference": self.reference,
        }
        path = save_checkpoint(self.root, filename, state, cfg.save_total_limit)
        log.info("saved checkpoint %s", path)
        self.monitor.plot()
        return path

    def export(self) -> None:
        weights, _ = self.engine.state(self.model, None, self.cfg.algorithm, None)  # on every rank
        if self.ctx.is_main:
            export_trained(self.model, self.tokenizer, self.cfg, self.root / "hf", weights)

    def evaluate(self, step: int, val: list) -> None:
        evaluate(self.model, self.tokenizer, self.fmt, self.cfg, step, self.monitor, val, self.dtype,
                 self.engine.objective)


def _train(cfg: Config, name: str, work_dir: str | None, seed: int | None, resume: str | None,
           ctx: processes.Context, deepspeed: dict | None) -> TrainResult:
    if seed is not None:  # --seed: a new Config, the loaded one stays as it was
        cfg = dataclasses.replace(cfg, seed=seed)
    seed_everything(cfg.seed)

    # Data first: bad data must fail in seconds, not after a 7B model has loaded.
    model_path, tokenizer, fit = setup_tokenizer(cfg)
    root = Path(work_dir) if work_dir else Path("work_dirs") / name
    if not (resume or cfg.auto_resume):
        refuse_existing_run(root)
    sequences, val, stats = setup_data(cfg, tokenizer, ctx, model_path, root)
    checkpoint = find_checkpoint(cfg, root, resume)
    micro_per_epoch = math.ceil(len(sequences) / (cfg.batch_size * ctx.world_size))  # global micro-batches
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.accumulative_counts)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.max_epochs

    root.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:  # run files and checkpoints come from rank 0 only
        remove_stale_temp_files(root)
    monitor_type = RunMonitor if ctx.is_main else processes.NullMonitor
    monitor = monitor_type(root, total_steps, cfg.log_interval, render_config(to_dict(cfg), name), name,
                           report_to=cfg.report_to, config=to_dict(cfg))
    try:
        # the template verdict goes with the run's first lines, so that an input error found earlier stays alone
        (log.warning if fit.verdict == "conflict" else log.info)(fit.message)
        log.info("config %s | model %s | algorithm %s", name, model_path, cfg.algorithm)
        log.info(stats.summary())
        if stats.skipped > stats.records // 10:
            log.warning("warning: %d of %d samples were dropped (no answer within max_length=%d or a bad record); "
                        "raise max_length if that is not intended", stats.skipped, stats.records, cfg.max_length)
        dtype = resolve_dtype(cfg.torch_dtype, ctx.device)
        fingerprint = data_fingerprint(sequences)
        model, engine = setup_model(cfg, ctx, model_path, dtype, deepspeed, checkpoint, fingerprint, root)
        optimizer, params = setup_optimizer(cfg, model, engine)
        scheduler = setup_scheduler(cfg, optimizer, total_steps)
        log.info("%d sequences, %d steps per epoch, %d steps in all", len(sequences), steps_per_epoch, total_steps)
        run = Run(cfg, ctx, root, model, engine, optimizer, params, scheduler, tokenizer,
                  PromptFormat(tokenizer, cfg.prompt_template, cfg.SYSTEM), monitor, dtype, fingerprint,
                  setup_reference(cfg, engine.objective, model, sequences + val, tokenizer, dtype, checkpoint))

        step = 0
        if checkpoint is not None:
            step = restore(checkpoint[1], engine, optimizer, scheduler, ctx)
            log.info("resumed from %s at step %d", checkpoint[0], step)
        monitor.set_position(step)
        if step >= total_steps:  # resumed from the final checkpoint: only the export may be missing
            done = (root / "hf").is_dir()  # written whole or not at all (fsutil.atomic_dir)
            log.info("the run is complete (step %d of %d)%s", step, total_steps,
                     f"; its adapter/model is in {root / 'hf'}" if done else "; writing its adapter/model")
            if not done:
                run.export()
                log.info("adapter/model in %s", root / "hf")
            return TrainResult(root, model, tokenizer, step)

        step = _loop(run, sequences, val, step, steps_per_epoch, total_steps)
        run.export()
        monitor.plot()
        log.info("done: %d steps; adapter/model in %s", step, root / "hf")
        return TrainResult(root, model, tokenizer, step)
    finally:
        monitor.close()


def _loop(run: Run, sequences: list, val: list, step: int, steps_per_epoch: int, total_steps: int) -> int:
    """Train from `step` to total_steps (epochs of optimizer steps, checkpoints, evaluation); the last step."""
    cfg, root = run.cfg, run.root
    stop_signal: list[int] = []
    handlers = _catch_signals(stop_signal)
    try:
        run.model.train()
        if step == 0:
            run.evaluate(0, val)
        bad_in_a_row, started = 0, time.time()
        first_epoch = step // steps_per_epoch + 1
        for epoch in range(first_epoch, math.ceil(total_steps / steps_per_epoch) + 1):
            windows = epoch_windows(sequences, cfg, epoch, run.ctx.world_size)
            for index, window in enumerate(windows):
                if (epoch - 1) * steps_per_epoch + index < step:
                    continue  # done before the resume
                loss, tokens, seconds = run.engine.optimizer_step(window, run.optimizer, run.params, cfg,
                                                                  run.tokenizer, run.dtype, step + 1, stop_signal)
                run.scheduler.step()
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
                    run.monitor.step({"step": step, "epoch": epoch, "loss": loss,
                                      "lr": run.scheduler.get_last_lr()[0],
                                      "tokens_per_s": tokens / max(seconds, 1e-9), "memory_gb": _memory_gb(),
                                      "time": round(time.time() - started, 3), **run.engine.objective.figures()})
                if stop_signal:
                    path = run.save(f"iter_{step}.pth", step, epoch)
                    signame = "SIGINT" if stop_signal[0] == signal.SIGINT else "SIGTERM"
                    raise TrainingInterrupted(f"{signame} at step {step}: checkpoint saved to {path}; continue "
                                              f"with `tunelab train ... --resume`", 128 + stop_signal[0])
                if step < total_steps and step % cfg.evaluation_freq == 0:
                    run.evaluate(step, val)
                if cfg.save_steps and step % cfg.save_steps == 0 and not bad_in_a_row:
                    run.save(f"iter_{step}.pth", step, epoch)
                if step >= total_steps:
                    break
            if not cfg.save_steps and (step == epoch * steps_per_epoch or step >= total_steps):
                # a max_steps stop mid-epoch is no whole epoch: name that checkpoint by its step
                run.save(f"epoch_{epoch}.pth" if step == epoch * steps_per_epoch else f"iter_{step}.pth", step, epoch)
            if step >= total_steps:
                break
        if cfg.save_steps and step % cfg.save_steps:  # the final weights are always in a checkpoint
            run.save(f"iter_{step}.pth", step, epoch)
        run.evaluate(step, val)
    finally:
        _restore_signals(handlers)
    return step


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
