"""NF4 dequantisation as one Triton kernel, double-quantised block scales included.

bitsandbytes stores a QLoRA weight as 4-bit NF4 codes, two per byte (the first in the high nibble), one
scale per block of 64 values, and, with double quantisation, those scales again as 8-bit codes with one fp32
scale per 256 of them plus an offset. The weight is dequantised for every GEMM that uses it, three times a
step with recomputation. bitsandbytes does that in two kernels when the scales are double-quantised (the
scales, then the weight; tunelab's fast path keeps the fp32 scales only when memory allows). This kernel
reads the codes and the 8-bit scales and writes the weight in one pass (one read of the codes instead of two
kernels' traffic; bench/RESULTS.md has the timings), with bitsandbytes' arithmetic (fp32 products, then one rounding), so the
result is identical to theirs.

Triton is imported only when the kernel is first used; `dequantize` is for CUDA tensors (or Triton's
interpreter, TRITON_INTERPRET=1, which the CPU test uses); `usable` checks it on a device before the fast
path relies on it.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("tunelab")

BYTES_PER_PROGRAM = 1024  # 2,048 values a program: 22k programs for a 4096 x 11008 weight


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequantize(packed, scales, scale_code, scale_scales, offset, table, out, n_bytes, n_values,
                       BYTES: tl.constexpr, BYTES_PER_SCALE: tl.constexpr, SCALES_PER_SCALE: tl.constexpr,
                       NESTED: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BYTES + tl.arange(0, BYTES)
        inside = offs < n_bytes
        byte = tl.load(packed + offs, mask=inside, other=0).to(tl.int32)
        block = offs // BYTES_PER_SCALE
        if NESTED:
            code = tl.load(scales + block, mask=inside, other=0).to(tl.int32)
            scale = tl.load(scale_code + code) * tl.load(scale_scales + block // SCALES_PER_SCALE, mask=inside,
                                                          other=0.0) + offset
        else:
            scale = tl.load(scales + block, mask=inside, other=0.0)
        first = tl.load(table + (byte >> 4)) * scale
        second = tl.load(table + (byte & 15)) * scale
        values = tl.interleave(first, second)
        out_offs = 2 * pid * BYTES + tl.arange(0, 2 * BYTES)
        tl.store(out + out_offs, values.to(out.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=out_offs < n_values)

    return nf4_dequantize


def dequantize(packed: torch.Tensor, quant_state, dtype: torch.dtype, scales: torch.Tensor | None = None,
               offset: float | None = None) -> torch.Tensor:
    """The weight of a bitsandbytes NF4 `quant_state` in `dtype`. `scales`: the block scales already in fp32
    (then the double quantisation is skipped); `offset`: quant_state.offset as a float (read once by the
    caller: reading it here would wait for the GPU, which a CUDA graph capture forbids)."""
    qs = quant_state
    if qs.quant_type != "nf4" or qs.blocksize % 2:
        raise ValueError(f"NF4 kernel: unsupported quantisation {qs.quant_type} / block size {qs.blocksize}")
    nested = scales is None and qs.nested
    if nested and offset is None:
        raise ValueError("NF4 kernel: double-quantised scales need the offset")
    if scales is None:
        scales = qs.absmax
    if nested:  # the second level: the scales' code table, their fp32 scales, how many each covers
        scale_code, scale_scales, per_scale = qs.state2.code, qs.state2.absmax, qs.state2.blocksize
    else:  # never read by the kernel: any tensor will do
        scale_code, scale_scales, per_scale = scales, scales, 1
    out = torch.empty(qs.shape, dtype=dtype, device=packed.device)
    n_bytes = packed.numel()
    _kernel()[(-(-n_bytes // BYTES_PER_PROGRAM),)](
        packed, scales, scale_code, scale_scales, float(offset or 0.0), qs.code, out, n_bytes, out.numel(),
        BYTES=BYTES_PER_PROGRAM, BYTES_PER_SCALE=qs.blocksize // 2, SCALES_PER_SCALE=per_scale, NESTED=nested,
        # bitsandbytes rounds code x scale, then adds the offset; a fused multiply-add rounds once, which
        # differs in the last bit (seen on an H200, not in the interpreter)
        enable_fp_fusion=False)
    return out


_usable: dict[torch.device, bool] = {}


def usable(device: torch.device) -> bool:
    """Whether the kernel runs on `device` and gives bitsandbytes' exact values, checked once per device on
    a small weight (both kinds of scales). Where it does not (no Triton, a compile error, a difference), the
    fast path keeps bitsandbytes' own kernels and the log says why. Never checked inside a CUDA graph
    capture (the check compiles and compares): the graphs' eager first step has checked it by then."""
    if device in _usable:
        return _usable[device]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    try:
        import bitsandbytes.functional as bnbf

        # its own generator: the check must not move the training's random state
        g = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(64, 320, device=device, dtype=torch.bfloat16, generator=g) * 3
        for nested in (False, True):
            packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
            ours = dequantize(packed, qs, torch.bfloat16, offset=float(qs.offset) if nested else None)
            if not torch.equal(ours, bnbf.dequantize_4bit(packed, qs)):
                raise ValueError("its values differ from bitsandbytes'")
        _usable[device] = True
    except Exception as exc:  # any failure only costs the kernel's speed
        log.warning("fast path: tunelab's NF4 kernel is not used on %s (%s: %s); bitsandbytes dequantises",
                    device, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        _usable[device] = False
    return _usable[device]
