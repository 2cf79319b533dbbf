"""The fast training path (GPU): fused, compiled, padding-free, chunked-loss forward over the model's own
parameters. `use_fast_path` decides; `attach` builds it; train.token_losses uses it when attached."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("tunelab")


def use_fast_path(cfg, device: str, model) -> bool:
    """Whether the fast path runs: the config and the device ask for it ('auto': LoRA/QLoRA on CUDA) and
    the (not yet LoRA-wrapped) model is one it supports. Decided before LoRA is added, because the plain
    path needs PEFT's k-bit preparation and transformers' own checkpointing, which the fast path does not."""
    from tunelab.fast.decoder import unsupported_reason

    if cfg.fast_path == "off":
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # the engines (DDP, FSDP2, DeepSpeed) hook the model's own forward; the fast path bypasses it
        log.info("fast path off: several processes (the engines need the model's own forward)")
        return False
    if cfg.fast_path != "on" and not (device.startswith("cuda") and cfg.algorithm in ("lora", "qlora")):
        return False
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("fast path off: %s", reason)
    return reason is None


def attach(model, cfg, device: str):
    """Build the fast forward for `model` (one that use_fast_path accepted)."""
    from tunelab.fast.decoder import FastDecoder

    compiled = device.startswith("cuda") and cfg.fast_compile
    fast = FastDecoder(model, compile=compiled, checkpointing=cfg.gradient_checkpointing,
                       checkpoint_layers=cfg.checkpoint_layers)
    log.info("fast path on (compiled: %s, layers recomputed in backward: %d of %d)", compiled,
             len(fast.checkpointed), len(fast.layers))
    return fast
