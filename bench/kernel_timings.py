"""Where a 7B-shaped step's GPU time goes, op by op: causal attention per SDPA backend (and PyTorch's varlen
attention), the frozen GEMMs in bf16, and NF4 dequantisation, at the bench's sequence lengths.

    python bench/kernel_timings.py                 # the table (GPU only)
    python bench/kernel_timings.py --tokens 8192   # one length

Each op runs forward and backward (input gradients only for the frozen GEMMs, as in LoRA) on fresh random
inputs; times are CUDA-event medians. The "layer x 32" rows add up one decoder layer's share, to hold
against the measured step time of bench/speed.py.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

HIDDEN, INTER, HEADS, LAYERS = 4096, 11008, 32, 32


def timed(fn, reps: int = 10) -> float:
    """Median milliseconds of fn() over reps runs after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_rows(n: int) -> list[tuple[str, float, str]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d = HIDDEN // HEADS
    q, k, v = (torch.randn(1, HEADS, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, HEADS, n, d, device="cuda", dtype=torch.bfloat16)
    flops = 4 * n * n * d * HEADS / 2 * 3.5  # causal: half the square; backward ~2.5x forward
    rows, ref = [], None
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("default", None)]
    for name, backend in backends * 2:  # the first pass warms the card up; the second is reported
        def run():
            q.grad = k.grad = v.grad = None
            if backend is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(grad)
            return out
        try:
            out = run()
            err = "" if ref is None else f"max |out - flash| {float((out.detach() - ref[0]).abs().max()):.3g}, " \
                  f"|dq - flash| {float((q.grad - ref[1]).abs().max()):.3g}"
            if ref is None:
                ref = (out.detach(), q.grad.clone())
            ms = timed(run)
            row = (f"attention {name} fwd+bwd", ms, f"{flops / ms / 1e9:.0f} TFLOP/s {err}")
        except Exception as e:  # a backend this build or card lacks
            row = (f"attention {name} fwd+bwd", float("nan"), f"unavailable: {str(e).splitlines()[0][:80]}")
        rows = [r for r in rows if r[0] != row[0]] + [row]
    try:
        from tunelab.fast.attention import VARLEN, _VARLEN_CAUSAL
        flat = [t.detach().transpose(1, 2).reshape(n, HEADS, d).requires_grad_() for t in (q, k, v)]
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")

        def run_varlen():
            out = VARLEN(*flat, cu, cu, n, n, **_VARLEN_CAUSAL)
            out.backward(grad.transpose(1, 2).reshape(n, HEADS, d))
        ms = timed(run_varlen)
        rows.append(("attention varlen fwd+bwd", ms, f"{flops / ms / 1e9:.0f} TFLOP/s"))
    except Exception as e:
        rows.append(("attention varlen fwd+bwd", float("nan"), f"unavailable: {str(e).splitlines()[0][:80]}"))
    return rows


def gemm_rows(n: int) -> list[tuple[str, float, str]]:
    rows = []
    x = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16)
    for name, out_f, in_f in [("q/k/v/o (one)", HIDDEN, HIDDEN), ("gate/up (one)", INTER, HIDDEN),
                              ("down", HIDDEN, INTER)]:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
        xi = torch.randn(n, in_f, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(n, out_f, device="cuda", dtype=torch.bfloat16)
        ms = timed(lambda: (F.linear(xi, w), g @ w))  # forward + input gradient
        rows.append((f"GEMM {name} fwd+dgrad", ms, f"{4 * n * out_f * in_f / ms / 1e9:.0f} TFLOP/s"))
        try:
            import bitsandbytes.functional as bnbf
            from tunelab.fast import nf4

            def rate(ms: float) -> str:  # 0.5 byte read and 2 written per value
                return f"{w.numel() * 2.5 / ms / 1e6:.0f} GB/s"

            packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
            ms = timed(lambda: torch.ops.bitsandbytes.dequantize_4bit.default(
                packed, state.absmax, state.blocksize, "nf4", state.shape, torch.bfloat16))
            rows.append((f"NF4 dequant {name}", ms, rate(ms)))
            # tunelab's kernel: fp32 scales given (what the fast path keeps when memory allows), and both
            # levels of double-quantised scales in the one pass (the lean setting)
            ms = timed(lambda: nf4.dequantize(packed, state, torch.bfloat16, scales=state.absmax))
            rows.append((f"NF4 dequant {name}, tunelab kernel", ms, rate(ms)))
            packed2, state2 = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            offset = float(state2.offset)
            ms = timed(lambda: nf4.dequantize(packed2, state2, torch.bfloat16, offset=offset))
            rows.append((f"NF4 dequant {name}, tunelab kernel, scales double-quantised", ms, rate(ms)))
            ms = timed(lambda: torch.ops.bitsandbytes.dequantize_4bit.default(
                packed2, (bnbf.dequantize_blockwise(state2.absmax, state2.state2) + state2.offset).float(),
                state2.blocksize, "nf4", state2.shape, torch.bfloat16))
            rows.append((f"NF4 dequant {name}, bitsandbytes, scales double-quantised", ms, rate(ms)))
        except ImportError:
            pass
    del x
    return rows


def fusion_rows(n: int) -> list[tuple[str, float, str]]:
    """Projections that read one input as one GEMM against one each (q/k/v and gate/up, frozen GEMMs and
    LoRA's rank-64 A), forward and input gradient: what concatenating their weights would gain."""
    rows = []
    t = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16)
    for name, outs in [("q/k/v", [HIDDEN] * 3), ("gate/up", [INTER] * 2), ("LoRA A q/k/v", [64] * 3),
                       ("LoRA A gate/up", [64] * 2)]:
        ws = [torch.randn(o, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02 for o in outs]
        gs = [torch.randn(n, o, device="cuda", dtype=torch.bfloat16) for o in outs]
        w_all, g_all = torch.cat(ws), torch.cat(gs, 1)
        flop = 2 * n * HIDDEN * sum(outs)

        def fwd_each():
            return [t @ w.t() for w in ws]

        def dgrad_each():
            dt = gs[0] @ ws[0]
            for g, w in zip(gs[1:], ws[1:]):
                dt.addmm_(g, w)
            return dt

        def wgrad_each():  # LoRA A's gradient: (rank x tokens) @ (tokens x hidden)
            return [g.t() @ t for g in gs]

        cases = [("fwd", fwd_each, lambda: t @ w_all.t()), ("dgrad", dgrad_each, lambda: g_all @ w_all)]
        if name.startswith("LoRA"):
            cases.append(("A grad", wgrad_each, lambda: g_all.t() @ t))
        for what, each, fused in cases:
            a, b = timed(each, 20), timed(fused, 20)
            rows.append((f"{name} {what}: each / one GEMM", a, f"one {b:.3f} ms ({a / b:.2f}x); "
                         f"each {flop / a / 1e9:.0f}, one {flop / b / 1e9:.0f} TFLOP/s"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="2048,8192,32768")
    ap.add_argument("--fusion", action="store_true", help="only the rows of fusion_rows")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    print("| tokens | op | ms | note |\n| --- | --- | --- | --- |")
    for n in (int(t) for t in args.tokens.split(",")):
        if args.fusion:
            for name, ms, note in fusion_rows(n):
                print(f"| {n} | {name} | {ms:.3f} | {note} |", flush=True)
            continue
        rows = attention_rows(n) + gemm_rows(n)
        for name, ms, note in rows:
            print(f"| {n} | {name} | {ms:.3f} | {note} |", flush=True)
        by = {name: ms for name, ms, _ in rows}
        att = min(ms for name, ms in by.items() if name.startswith("attention") and ms == ms)
        gemm = 4 * by["GEMM q/k/v/o (one) fwd+dgrad"] + 2 * by["GEMM gate/up (one) fwd+dgrad"] \
            + by["GEMM down fwd+dgrad"]
        dq = 2 * (4 * by.get("NF4 dequant q/k/v/o (one)", 0) + 2 * by.get("NF4 dequant gate/up (one)", 0)
                  + by.get("NF4 dequant down", 0))
        print(f"| {n} | layer x {LAYERS}: GEMMs {gemm * LAYERS:.0f} ms + best attention {att * LAYERS:.0f} ms "
              f"+ NF4 dequant (fwd+bwd) {dq * LAYERS:.0f} ms | {(gemm + att + dq) * LAYERS:.0f} | "
              f"floor {n / ((gemm + att) * LAYERS / 1e3):,.0f} tok/s (LoRA), "
              f"{n / ((gemm + att + dq) * LAYERS / 1e3):,.0f} (QLoRA), no recomputation |", flush=True)


if __name__ == "__main__":
    main()
