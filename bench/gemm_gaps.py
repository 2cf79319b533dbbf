"""What runs between the fast path's large GEMMs, replayed in a CUDA graph as the step is.

The 7B 8,192-token QLoRA step's timeline (bench/RESULTS.md, eleventh session) showed cuBLAS's large Hopper
GEMMs starting 10-16 us after the kernel before them, with a 4-byte memset in between: with its default
workspace (32 MiB per stream on a Hopper card) cuBLAS picks kernels that zero a flag in it first. This script
times orderings of the same work in one graph each and counts the memsets in one replay; run it with and
without a workspace:

    python bench/gemm_gaps.py                                   # 8,192 and 2,048 tokens (GPU only)
    CUBLAS_WORKSPACE_CONFIG=:0:0 python bench/gemm_gaps.py      # no workspace (what tunelab's fast path uses)

Rows (each 32 GEMMs of the 7B q projection's shape; mean ms per replay of 20):
  gemm          the GEMMs alone
  prep          the weight-writing kernels alone (an elementwise product standing in for NF4 dequantisation)
  small         the LoRA A products alone (rank 3 x 64)
  prep>gemm     each weight written right before its GEMM
  prep>a>gemm   a LoRA A product between the write and the GEMM
  prep4>gemm4   four weights written, then their four GEMMs
  residual      the GEMMs with a residual added in their epilogue (addmm)
  gemm>cast>add the LoRA B product added into each output after casting B to bf16
  gemm>add      the same with B cast beforehand
"extra us per GEMM": the row's time less its parts' times, per GEMM.
"""
from __future__ import annotations

import argparse
import os

import torch

HIDDEN, RANK, N = 4096, 64, 32


def replayed(fn, reps: int = 20) -> tuple[float, int]:
    """fn captured in one CUDA graph: the mean milliseconds of a replay, and how many memset nodes a replay runs
    (cuBLAS zeroes a 4-byte flag before some GEMMs)."""
    from torch.profiler import ProfilerActivity, profile

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, sum(1 for e in prof.events() if "memset" in e.name.lower())


def rows(tokens: int) -> list[tuple[str, float, float | None, int]]:
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(tokens, HIDDEN, device=dev, dtype=bf)
    src = [torch.randn(HIDDEN, HIDDEN, device=dev, dtype=bf) for _ in range(4)]
    a = torch.randn(3 * RANK, HIDDEN, device=dev, dtype=bf)
    xa = torch.randn(tokens, RANK, device=dev, dtype=bf)
    b32 = torch.randn(HIDDEN, RANK, device=dev)
    b16 = b32.to(bf)
    res = torch.randn(tokens, HIDDEN, device=dev, dtype=bf)

    def gemm():
        for i in range(N):
            x @ src[i % 4].t()

    def prep():
        for i in range(N):
            src[i % 4] * 1

    def small():
        for _ in range(N):
            x @ a.t()

    def prep_gemm():
        for i in range(N):
            x @ (src[i % 4] * 1).t()

    def prep_small_gemm():
        for i in range(N):
            w = src[i % 4] * 1
            x @ a.t()
            x @ w.t()

    def prep4_gemm4():
        for _ in range(N // 4):
            ws = [s * 1 for s in src]
            for w in ws:
                x @ w.t()

    def residual():
        for i in range(N):
            torch.addmm(res, x, src[i % 4].t())

    def gemm_cast_add():
        for i in range(N):
            (x @ src[i % 4].t()).addmm_(xa, b32.to(bf).t())

    def gemm_add():
        for i in range(N):
            (x @ src[i % 4].t()).addmm_(xa, b16.t())

    fns = [("gemm", gemm), ("prep", prep), ("small", small), ("prep>gemm", prep_gemm),
           ("prep>a>gemm", prep_small_gemm), ("prep4>gemm4", prep4_gemm4), ("residual", residual),
           ("gemm>cast>add", gemm_cast_add), ("gemm>add", gemm_add)]
    measured = {name: replayed(fn) for name, fn in fns}
    t = {name: ms for name, (ms, _) in measured.items()}
    parts = {"prep>gemm": t["gemm"] + t["prep"], "prep>a>gemm": t["gemm"] + t["prep"] + t["small"],
             "prep4>gemm4": t["gemm"] + t["prep"]}
    return [(name, ms, (ms - parts[name]) * 1000 / N if name in parts else None, memsets)
            for name, (ms, memsets) in measured.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="8192,2048")
    ap.add_argument("--blas", choices=["cublas", "cublaslt"], help="torch.backends.cuda.preferred_blas_library")
    args = ap.parse_args()
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    setting = f"{torch.backends.cuda.preferred_blas_library()}, CUBLAS_WORKSPACE_CONFIG=" \
              f"{os.environ.get('CUBLAS_WORKSPACE_CONFIG', '(unset)')}"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {setting}")
    print("| tokens | order | ms per replay | extra us per GEMM | memsets |\n| --- | --- | --- | --- | --- |")
    for tokens in (int(s) for s in args.tokens.split(",")):
        for name, ms, extra, memsets in rows(tokens):
            print(f"| {tokens:,} | {name} | {ms:.3f} | {'' if extra is None else f'{extra:.1f}'} | {memsets} |")


if __name__ == "__main__":
    main()
