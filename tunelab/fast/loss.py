"""Linear + cross-entropy in chunks: per-token losses without ever holding the full (tokens x vocab) logits.

The forward pass computes, chunk by chunk, the logits in fp32, the per-token loss and at once its gradient
with respect to the hidden states (and the head weight when it trains). The backward pass only scales those
saved gradients by the incoming per-token gradient: d loss_i / d h_i does not depend on the other tokens, so
this is exact. Peak extra memory is one chunk of logits instead of all of them and their gradient."""
from __future__ import annotations

import torch

IGNORE = -100


def chunk_losses_and_grad(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    """One chunk's per-token losses (fp32) and d loss / d logits (softmax - onehot, zero on ignored tokens; in the
    logits' dtype), from its logits as the head's GEMM gave them. In place on one fp32 copy of the logits, so
    eagerly a chunk holds one fp32 (chunk x vocab) tensor, not two; compiled (the fast path on a GPU),
    torch.compile fuses those passes over the chunk (times and peaks: bench/RESULTS.md, 2026-12-06)."""
    valid = targets != IGNORE
    x = logits.float()
    if softcap:  # Gemma 2: cap * tanh(logits / cap); its derivative, 1 - tanh^2, is kept in `squash`
        squash = x.div_(softcap).tanh_()
        x = squash * softcap
        squash = squash.square_().neg_().add_(1)
    lse = torch.logsumexp(x, dim=-1)
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    picked = x.gather(1, safe_t[:, None]).squeeze(1)
    losses = torch.where(valid, lse - picked, torch.zeros_like(lse))
    grad = x.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, safe_t[:, None], -torch.ones_like(picked)[:, None])
    grad *= valid[:, None]
    if softcap:
        grad *= squash
    return losses, grad.to(logits.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, softcap: float | None, elementwise):
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
            if may_skip and not bool((t != IGNORE).any()):
                continue
            losses[start:start + chunk_size], grad_logits = elementwise(h @ weight.t(), t, softcap)
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
        return dh, dw, None, None, None, None


CHUNK_BYTES = 128 * 2**20  # fp32 logits per chunk: a 32k vocabulary gives 1,024-token chunks


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: the largest power of two (256 to 4,096) whose fp32 logits fit CHUNK_BYTES. Bigger
    chunks gain little (the head's GEMM is already large at 1,024 x 4,096 x 32,000) and their logits sit on
    top of the gradients at the step's peak, which a CUDA graph keeps allocated throughout."""
    n = 256
    while n < 4096 and 2 * n * vocab * 4 <= CHUNK_BYTES:
        n *= 2
    return n


def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int | None = None, softcap: float | None = None,
                         elementwise=chunk_losses_and_grad) -> torch.Tensor:
    """Per-token cross entropy of `hidden @ weight.T` against `targets` (IGNORE gives 0), shape (tokens,).
    hidden: (tokens, dim); weight: (vocab, dim); targets: (tokens,); chunk_size: tokens per chunk
    (default: chunk_tokens(vocab)); softcap: the logits are capped to cap * tanh(logits / cap) first (Gemma 2);
    elementwise: chunk_losses_and_grad, or the fast path's compiled copy of it."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size or chunk_tokens(weight.shape[0]),
                                            softcap, elementwise)
