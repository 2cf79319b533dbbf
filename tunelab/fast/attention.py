"""Causal attention confined to each packed sample, without a (tokens x tokens) mask.

A batch row may hold several samples (segment ids 0, 1, 2, ... and -1 for padding). On CUDA the rows are
flattened and handed to PyTorch's variable-length flash attention (`torch.nn.attention.varlen`) with the
sample boundaries as cumulative lengths, so no sample attends to another and no padding is computed beyond
its own segment. Elsewhere (CPU, or a PyTorch without varlen) scaled_dot_product_attention runs with a
boolean block-diagonal causal mask, the reference the fast path is tested against. A sliding window (Mistral:
a token sees the last `window` tokens of its sample, itself included, as transformers' sliding_window_overlay)
narrows either to a band.

Softcapped attention scores (Gemma 2: score = cap * tanh(score / cap), before the softmax) are something
neither kernel computes. Those layers alone take another way: on CUDA, PyTorch's flex_attention, compiled, with
the softcap as its score_mod and a block mask of causal + same sample (+ the window) over the flattened rows, so
whole blocks of other samples are skipped as varlen skips them; elsewhere the same in plain tensor ops (scores,
softcap, mask, softmax in fp32), the reference it is tested against."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PackedLayout:
    """Where the samples of a (batch, seq) block start and end; built once per batch, used by every layer."""
    single: bool                        # one causal sample per row, no padding: plain causal attention
    cu_seqlens: torch.Tensor | None     # int32 (samples + 1,) offsets into the flattened tokens
    max_len: int
    mask: torch.Tensor | None           # bool (batch, 1, seq, seq) for the reference path
    # flex_attention's block masks (softcapped layers on CUDA), by window: made by the first layer that needs
    # one, then shared by the others and by their recomputation in backward
    blocks: dict = field(default_factory=dict)


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


def width_bucket(n: int) -> int:
    """The width that `n` tokens are padded to where a shape is captured or compiled once (CUDA graphs,
    flex_attention), so that near lengths share it: the next power of two or multiple of 512, whichever is
    smaller."""
    return min(1 << max(0, n - 1).bit_length(), -(-n // 512) * 512)


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
              window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: (batch, seq, heads, dim); k, v: (batch, seq, kv_heads, dim). Returns (batch, seq, heads, dim).
    `window`: the sliding window, if any; `softcap`: the scores' softcap, if any."""
    n = q.shape[1]
    if window is not None and window >= n:  # no sample is longer: plain causal attention
        window = None
    if softcap is not None:
        if q.is_cuda and layout.mask is None:
            return flex(q, k, v, layout, scale, window, softcap)
        return _softcapped_reference(q, k, v, _mask(layout, n, window, q.device), scale, softcap)
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
    mask = _mask(layout, n, window, q.device)
    if mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, **gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, **gqa)
    return out.transpose(1, 2)


def _mask(layout: PackedLayout, n: int, window: int | None, device) -> torch.Tensor | None:
    """The reference path's boolean mask, (batch, 1, n, n) or (n, n); None for plain causal attention."""
    mask = layout.mask
    if window is not None:  # within a sample, row distance is position distance
        band = torch.ones(n, n, dtype=torch.bool, device=device).tril().triu(1 - window)
        mask = band if mask is None else mask & band
    return mask


def _softcapped_reference(q, k, v, mask: torch.Tensor | None, scale: float, softcap: float) -> torch.Tensor:
    """Softcapped attention in plain tensor ops, as Gemma 2's own (eager) attention computes it."""
    n, h = q.shape[1], q.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if kt.shape[1] != h:
        kt, vt = (t.repeat_interleave(h // kt.shape[1], dim=1) for t in (kt, vt))
    scores = softcap * torch.tanh(qt @ kt.transpose(-2, -1) * scale / softcap)
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ vt).transpose(1, 2)


# -- flex_attention (softcapped layers on CUDA) -----------------------------------------------------------------
# Compiled for static shapes (dynamic=False), once per shape: the tokens are padded to a width_bucket, so that
# rows of near lengths (packed rows, without CUDA graphs' own padding) share one. The score_mod and mask_mods
# are made once per softcap and window, so that a new batch of a shape meets the same compiled code (its
# samples are a tensor the mask reads, not a constant).

@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask, dynamic=False)


def _eager():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return flex_attention, create_block_mask


@functools.cache
def softcap_score(cap: float):
    """flex_attention's score_mod for scores softcapped at `cap` (after the scale, before the mask)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return score_mod


@functools.cache
def causal_mask(window: int | None):
    """flex_attention's mask_mod of one sample per row: causal, within `window` tokens where there is one."""
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def banded(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return causal if window is None else banded


def sample_mask(sample: torch.Tensor, window: int | None):
    """flex_attention's mask_mod over flattened rows: causal within each sample (`sample`: its number, per
    token), within `window` tokens where there is one. Within a sample, index distance is position distance."""
    def same_sample(b, h, q_idx, kv_idx):
        return (sample[q_idx] == sample[kv_idx]) & (q_idx >= kv_idx)

    def banded(b, h, q_idx, kv_idx):
        return (sample[q_idx] == sample[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return same_sample if window is None else banded


def block_mask(layout: PackedLayout, tokens: int, window: int | None, create, device):
    """flex_attention's block mask for `layout` (made by `create`, create_block_mask): per row where each row
    is one sample (`tokens` long), else over the rows flattened into one sequence of `tokens`, each token's
    sample the number of cumulative offsets at or below its index (tokens past the last offset, padding, are
    one more sample). Made once per layout and window."""
    found = layout.blocks.get(window)
    if found is None:
        if layout.cu_seqlens is None:
            mask_mod = causal_mask(window)
        else:
            cu = layout.cu_seqlens
            index = torch.arange(tokens, dtype=cu.dtype, device=cu.device)
            mask_mod = sample_mask(torch.searchsorted(cu, index, right=True), window)
        found = layout.blocks[window] = create(mask_mod, None, None, tokens, tokens, device=device)
    return found


def flex(q, k, v, layout: PackedLayout, scale: float, window: int | None, softcap: float,
         compiled: bool = True) -> torch.Tensor:
    """Softcapped attention by flex_attention (`compiled`: as it runs on CUDA; eagerly it materialises the
    scores): (batch, seq, heads, dim) in and out. Packed rows run as one sequence, their samples kept apart by
    the block mask; either is padded at its end to a width_bucket, which no real token attends to (causal)."""
    b, n, h, d = q.shape
    attend, create = _compiled() if compiled else _eager()
    if layout.cu_seqlens is not None:
        q, k, v = (t.reshape(1, b * n, t.shape[2], d) for t in (q, k, v))
    tokens = q.shape[1]
    padded = width_bucket(tokens)
    if padded != tokens:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, padded - tokens)) for t in (q, k, v))
    blocks = block_mask(layout, padded, window, create, q.device)
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=softcap_score(float(softcap)),
                 block_mask=blocks, scale=scale, enable_gqa=k.shape[2] != h)
    return out.transpose(1, 2)[:, :tokens].reshape(b, n, h, d)
