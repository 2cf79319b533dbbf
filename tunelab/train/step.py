"""One training step of one process: the micro-batches of an optimizer step (epoch_windows), each one forward and
backward (forward_backward: a replayed CUDA graph on the fast path), then clipping and the update
(optimizer_step). Several processes run tunelab.train.engines's engines instead, on the same windows."""
from __future__ import annotations

import random
import time
from functools import partial
from typing import Callable

import torch

from tunelab.config.schema import Config
from tunelab.data.dataset import Sequence, collate
from tunelab.model.losses import token_losses


def forward_backward(model, batch: dict[str, torch.Tensor], dtype: torch.dtype, n_targets: int,
                     loss_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """loss = (sum of the batch's per-token losses) / n_targets, or loss_of(per-token losses) (a preference
    objective's, objective.py); adds its gradient to the parameters and returns it (0-dim, detached). On the
    fast path with CUDA graphs a micro-batch is replayed graphs (fast/graphs.py)."""
    graphs = getattr(model, "tunelab_graphs", None)
    if graphs is not None and model.training:
        loss = graphs.forward_backward(batch, dtype, n_targets, loss_of)
        if loss is not None:
            return loss
    losses = token_losses(model, batch, dtype)
    loss = losses.sum() / n_targets if loss_of is None else loss_of(losses)
    loss.backward()
    return loss.detach()


def epoch_windows(sequences: list[Sequence], cfg: Config, epoch: int,
                   world: int = 1) -> list[list[list[Sequence]]]:
    """The epoch's optimizer steps, each a list of micro-batches. The order depends only on (seed, epoch),
    so a resumed run sees exactly the batches the uninterrupted run would have. With `world` processes a
    micro-batch holds batch_size x world sequences, of which each rank trains on its own batch_size."""
    order = list(range(len(sequences)))
    if cfg.shuffle:
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    size = cfg.batch_size * world
    micro = [[sequences[i] for i in order[j:j + size]] for j in range(0, len(order), size)]
    return [micro[i:i + cfg.accumulative_counts] for i in range(0, len(micro), cfg.accumulative_counts)]


def optimizer_step(model, window: list[list[Sequence]], optimizer, params, cfg: Config, tokenizer, dtype,
                    step: int, objective=None) -> tuple[float | None, int, float]:
    """One optimizer step; the loss is the mean over all target tokens of the window, or a preference
    objective's (objective.py), whose figures it keeps for the log. Returns loss None
    (and leaves the weights and the optimizer's state untouched) when the loss or the gradient is not finite.

    The host waits for the GPU once, at the end: the finiteness test runs on the device, and a fused AdamW
    skips its update there (`found_inf`, as under a gradient scaler), so clipping and the update are queued
    while the micro-batches still run instead of after them, with the GPU idle in between."""
    t0 = time.time()
    n_targets = sum(s.n_targets for batch in window for s in batch)
    n_tokens = sum(len(s) for batch in window for s in batch)
    if objective is not None:
        objective.begin(window)
    losses = []
    for batch in window:
        tensors = collate(batch, tokenizer.pad_token_id)
        loss_of = None if objective is None or objective.name == "sft" else \
            partial(objective.loss, batch=tensors, rows=batch)
        losses.append(forward_backward(model, tensors, dtype, n_targets, loss_of))
    total = torch.stack(losses).sum()
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_norm if cfg.max_norm else float("inf"))
    finite = torch.isfinite(total) & torch.isfinite(norm)
    on_device = skips_on_device(optimizer)
    if on_device:
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    value, ok = torch.stack([total.float(), finite.float()]).tolist()  # the one wait for the GPU
    if ok and not on_device:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (value if ok else None), n_tokens, time.time() - t0


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer` can be told on the device to skip a step: torch's fused Adam/AdamW reads a
    `found_inf` tensor and then leaves the weights, moments and step count as they were."""
    return isinstance(optimizer, torch.optim.Adam) and all(g.get("fused") for g in optimizer.param_groups)
