"""The per-token losses of a (PEFT-wrapped) causal LM on a batch of packed rows: the fast path's where one is
attached (model.tunelab_fast, training), else the model's own forward with the packed rows' attention mask.
reference_token_losses: the same for a preference run's reference, the base with the adapter off."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from tunelab.data.dataset import model_attention_mask
from tunelab.data.encode import IGNORE


def token_losses(model, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per-token cross entropy (0 where the target is ignored), shape (batch, seq)."""
    device = next(p for p in model.parameters()).device
    fast = getattr(model, "tunelab_fast", None)
    if fast is not None and model.training:
        return fast.token_losses(batch, dtype)
    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = device.type == "cuda" and dtype != torch.float32
    # without autocast (CPU keeps fp32 weights) attention runs in the weights' dtype, and so must its mask
    mask_dtype = dtype if autocast else next(p.dtype for p in model.parameters() if p.is_floating_point())
    config = getattr(model, "module", model).config  # through a DDP or DeepSpeed wrapper
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=model_attention_mask(config, batch["segment_ids"], mask_dtype),
                    use_cache=False)
    logits = out.logits.float()
    losses = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE,
                             reduction="none")
    return losses.view(batch["targets"].shape)


@torch.no_grad()
def reference_token_losses(model, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """token_losses of the model without its LoRA adapter (the model itself when it has none), without dropout.
    The fast path reads the LoRA weights itself, so there the adapter is taken out of its projections; on the
    plain path PEFT turns it off."""
    was_training = model.training
    model.eval()
    try:
        fast = getattr(model, "tunelab_fast", None)
        if fast is not None:
            graphs = getattr(model, "tunelab_graphs", None)  # a replayed forward (fast/graphs.py)
            losses = graphs.reference_losses(batch, dtype) if graphs is not None else None
            if losses is not None:
                return losses
            with fast.adapters_off():
                return fast.token_losses(batch, dtype)
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            return token_losses(model, batch, dtype)
    finally:
        model.train(was_training)
