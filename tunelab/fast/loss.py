"""Linear + cross-entropy in chunks: per-token losses without ever holding the full (tokens x vocab) logits.

The forward pass computes, chunk by chunk, the logits in fp32, the per-token loss and at once its gradient
with respect to the hidden states (and the head weight when it trains). The backward pass only scales those
saved gradients by the incoming per-token gradient: d loss_i / d h_i does not depend on the other tokens, so
this is exact. Peak extra memory is one chunk of logits instead of all of them (for a 32k vocabulary and 8k
tokens that is 1 GiB of fp32 logits plus as much again for their gradient)."""
from __future__ import annotations

import torch

IGNORE = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        n = hidden.shape[0]
        losses = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden)
        weight_trains = ctx.needs_input_grad[1]
        # skipping chunks without targets needs a GPU sync, which a CUDA graph capture does not allow
        may_skip = not (hidden.is_cuda and torch.cuda.is_current_stream_capturing())
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight_trains else None
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            valid = t != IGNORE
            if may_skip and not bool(valid.any()):
                continue
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = torch.where(valid, t, torch.zeros_like(t))
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            losses[start:start + chunk_size] = torch.where(valid, lse - picked, torch.zeros_like(lse))
            # d loss / d logits = softmax - onehot, zero on ignored tokens
            grad_logits = torch.softmax(logits, dim=-1)
            grad_logits.scatter_add_(1, safe_t[:, None], -torch.ones_like(picked)[:, None])
            grad_logits *= valid[:, None]
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[start:start + chunk_size] = grad_logits @ weight
            if weight_trains:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight if weight_trains else None)
        ctx.weight_dtype = weight.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_losses.to(grad_hidden.dtype)[:, None]
        dh = grad_hidden * scale
        dw = None
        if grad_weight is not None:
            # a per-token scale inside the sum: only exact for a uniform scale (the training loss is a mean),
            # which is what the training loop uses; checked below so a misuse cannot pass silently
            if not torch.all(grad_losses == grad_losses.flatten()[0]):
                raise RuntimeError("chunked_token_losses: a trainable head needs a uniform loss weight")
            dw = (grad_weight * grad_losses.flatten()[0]).to(ctx.weight_dtype)
        return dh, dw, None, None


def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 4096) -> torch.Tensor:
    """Per-token cross entropy of `hidden @ weight.T` against `targets` (IGNORE gives 0), shape (tokens,).
    hidden: (tokens, dim); weight: (vocab, dim); targets: (tokens,)."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
