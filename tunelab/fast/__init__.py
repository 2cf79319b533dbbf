"""The fast training path (GPU): fused, compiled, padding-free, chunked-loss forward over the model's own
parameters. `use_fast_path` decides; `attach` builds it; train.token_losses uses it when attached."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("tunelab")


def use_fast_path(cfg, device: str) -> bool:
    """Whether the config and the device ask for the fast path ('auto': LoRA/QLoRA on CUDA)."""
    if cfg.fast_path == "off":
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # the engines (DDP, FSDP2, DeepSpeed) hook the model's own forward; the fast path bypasses it
        log.info("fast path off: several processes (the engines need the model's own forward)")
        return False
    if cfg.fast_path == "on":
        return True
    return device.startswith("cuda") and cfg.algorithm in ("lora", "qlora")


def attach(model, cfg, device: str):
    """Build the fast forward for `model` (None, with a log line, when the model is not supported)."""
    from tunelab.fast.decoder import FastDecoder, unsupported_reason

    reason = unsupported_reason(model)
    if reason is not None:
        log.info("fast path off: %s", reason)
        return None
    compiled = device.startswith("cuda") and cfg.fast_compile
    fast = FastDecoder(model, compile=compiled, checkpointing=cfg.gradient_checkpointing,
                       checkpoint_layers=cfg.checkpoint_layers)
    log.info("fast path on (compiled: %s, layers recomputed in backward: %d of %d)", compiled,
             len(fast.checkpointed), len(fast.layers))
    return fast
