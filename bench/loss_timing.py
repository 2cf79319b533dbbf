"""The fast path's chunked LM-head loss on a GPU: each chunk's loss and logit gradient computed eagerly against
compiled (what the fast path runs), at real shapes' vocabularies; CUDA-event time of forward + backward and the
peak memory (bench/RESULTS.md, 2026-12-06).

    python bench/loss_timing.py
"""
from __future__ import annotations

import torch

from tunelab.fast.loss import chunk_losses_and_grad, chunked_token_losses

# tokens, hidden, vocabulary, logit softcap: Llama 3, Qwen 2.5/3, Gemma 2 at 2,048 tokens; Llama 3 at 8,192
SHAPES = [(2048, 4096, 128256, None), (2048, 4096, 151936, None), (2048, 3584, 256000, 30.0), (8192, 4096, 128256, None)]


def time_ms(hidden, weight, targets, softcap, elementwise, calls: int = 10) -> tuple[float, float]:
    """Mean ms per forward + backward after three warm-up calls, and the peak GiB allocated."""
    run = lambda: chunked_token_losses(hidden, weight, targets, softcap=softcap,  # noqa: E731
                                       elementwise=elementwise).sum().backward()
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    compiled = torch.compile(chunk_losses_and_grad)
    print("| tokens | hidden | vocabulary | logit softcap | eager ms | compiled ms | peak GiB eager / compiled |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for tokens, dim, vocab, cap in SHAPES:
        hidden = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(vocab, dim, device="cuda", dtype=torch.bfloat16) * 0.02
        targets = torch.randint(0, vocab, (tokens,), device="cuda")
        (e_ms, e_gib), (c_ms, c_gib) = (time_ms(hidden, weight, targets, cap, f)
                                        for f in (chunk_losses_and_grad, compiled))
        print(f"| {tokens:,} | {dim:,} | {vocab:,} | {cap or '-'} | {e_ms:.2f} | {c_ms:.2f} | "
              f"{e_gib:.2f} / {c_gib:.2f} |", flush=True)


if __name__ == "__main__":
    main()
