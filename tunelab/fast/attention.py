"""Causal attention confined to each packed sample, without a (tokens x tokens) mask.

A batch row may hold several samples (segment ids 0, 1, 2, ... and -1 for padding). On CUDA the rows are
flattened and handed to PyTorch's variable-length flash attention (`torch.nn.attention.varlen`) with the
sample boundaries as cumulative lengths, so no sample attends to another and no padding is computed beyond
its own segment. Elsewhere (CPU, or a PyTorch without varlen) scaled_dot_product_attention runs with a
boolean block-diagonal causal mask, the reference the fast path is tested against. A sliding window (Mistral:
a token sees the last `window` tokens of its sample, itself included, as transformers' sliding_window_overlay)
narrows either to a band."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PackedLayout:
    """Where the samples of a (batch, seq) block start and end; built once per batch, used by every layer."""
    single: bool                        # one causal sample per row, no padding: plain causal attention
    cu_seqlens: torch.Tensor | None     # int32 (samples + 1,) offsets into the flattened tokens
    max_len: int
    mask: torch.Tensor | None           # bool (batch, 1, seq, seq) for the reference path


def _varlen():
    """PyTorch's varlen attention and the keyword arguments this version takes for causal masking and the
    scale (the signature changed between releases); (None, {}) where there is none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


VARLEN, _VARLEN_CAUSAL = _varlen()
_VARLEN_TAKES_SCALE = VARLEN is not None and "scale" in inspect.signature(VARLEN).parameters
_VARLEN_TAKES_WINDOW = "window_size" in _VARLEN_CAUSAL


def windowed(device) -> bool:
    """Whether attention() can apply a sliding window on `device` (the masked reference always can)."""
    return torch.device(device).type != "cuda" or VARLEN is None or _VARLEN_TAKES_WINDOW


def packed_layout(segment_ids: torch.Tensor, use_varlen: bool, device=None) -> PackedLayout:
    """The layout of a batch from its segment ids (batch, seq), worked out on the CPU (no GPU sync) and moved
    to `device` (default: where the ids are)."""
    device = device if device is not None else segment_ids.device
    seg = segment_ids.cpu()
    b, n = seg.shape
    if bool((seg == 0).all()):
        return PackedLayout(True, None, n, None)
    if use_varlen:
        flat = seg.flatten()
        row = torch.arange(b).repeat_interleave(n)
        starts = torch.ones_like(flat, dtype=torch.bool)
        # a new sample starts where the segment id or the row changes
        starts[1:] = (flat[1:] != flat[:-1]) | (row[1:] != row[:-1])
        cu = torch.cat([torch.nonzero(starts).flatten(), torch.tensor([flat.numel()])])
        longest = int((cu[1:] - cu[:-1]).max())
        return PackedLayout(False, cu.to(torch.int32).to(device, non_blocking=True), longest, None)
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return PackedLayout(False, None, n, (same & causal)[:, None].to(device))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float,
              window: int | None = None) -> torch.Tensor:
    """q: (batch, seq, heads, dim); k, v: (batch, seq, kv_heads, dim). Returns (batch, seq, heads, dim).
    `window`: the sliding window, if any."""
    n = q.shape[1]
    if window is not None and window >= n:  # no sample is longer: plain causal attention
        window = None
    if layout.cu_seqlens is not None:
        b, n, h, d = q.shape
        kv_heads = k.shape[2]
        if kv_heads != h:  # older varlen builds take equal head counts only
            k = k.repeat_interleave(h // kv_heads, dim=2)
            v = v.repeat_interleave(h // kv_heads, dim=2)
        flat = lambda t: t.reshape(b * n, h, d)  # noqa: E731
        kwargs = {"scale": scale} if _VARLEN_TAKES_SCALE else {}
        causal = _VARLEN_CAUSAL if window is None else {"window_size": (window - 1, 0)}
        out = VARLEN(flat(q), flat(k), flat(v), layout.cu_seqlens, layout.cu_seqlens,
                     layout.max_len, layout.max_len, **causal, **kwargs)
        return out.view(b, n, h, d)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = {"enable_gqa": True} if kt.shape[1] != qt.shape[1] else {}
    if layout.single and window is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, **gqa)
    else:
        mask = layout.mask
        if window is not None:  # within a sample, row distance is position distance
            band = torch.ones(n, n, dtype=torch.bool, device=q.device).tril().triu(1 - window)
            mask = band if mask is None else mask & band
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, **gqa)
    return out.transpose(1, 2)
