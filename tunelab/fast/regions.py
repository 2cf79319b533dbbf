"""What the fast path's layers compute between the frozen GEMMs: RMSNorm (Llama's and Gemma's), RoPE with the
optional per-head q/k norms, the gated activations (SwiGLU, GeGLU) and SwiGLU's in-place backward, LoRA branches,
residual adds and the post-sublayer norms. FastDecoder compiles them (torch.compile) and calls them between its
GEMMs; they read and write plain tensors, so all layers share one compiled graph per function."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.fast.parts import Proj


def rms_norm(x, weight, eps, gemma: bool = False):
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:  # Gemma scales by (1 + w), in fp32
        return (x32 * (1.0 + weight.float())).to(dtype)
    return (weight * x32.to(dtype)).to(dtype)  # as HF computes it, then in the compute dtype


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FrozenLinear4bit(torch.autograd.Function):
    """x @ W.T for a frozen NF4 weight that is dequantised again in backward instead of being kept: the
    bf16 copy of a layer's weights lives only while its GEMMs run."""

    @staticmethod
    def forward(ctx, x, proj: "Proj"):
        ctx.proj = proj
        return F.linear(x, proj.weight(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.proj.weight(grad.dtype), None


def frozen_projection(x, p: Proj):
    """The frozen projection (no LoRA); nothing beyond the weight itself is kept for backward."""
    if getattr(p.base.weight, "quant_state", None) is not None:
        y = FrozenLinear4bit.apply(x, p)
        return y if p.bias is None else y + p.bias.to(y.dtype)
    return F.linear(x, p.weight(x.dtype), None if p.bias is None else p.bias.to(x.dtype))


def lora_args(p: Proj) -> tuple:
    """A projection's LoRA branch as the compiled regions take it: (A, B, scale)."""
    return p.lora_a, p.lora_b, p.scale


def lora_branch(x, a, b, scale, dropout: float, training: bool):
    if a is None:
        return 0
    xa = F.dropout(x, dropout, training) if dropout else x
    return F.linear(F.linear(xa, a.to(x.dtype)), b.to(x.dtype)) * scale


def recomputed(fn, *args):
    """fn(*args), recomputed in backward instead of kept: for cheap pointwise work over tensors that backward
    keeps anyway. Inside a compiled region the checkpoint tells the partitioner so; left to itself it kept
    the normed inputs and the SwiGLU product, 4.7 of a layer's ~16 hidden-sized saved tensors."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def swiglu(g, u):
    return F.silu(g) * u


def geglu(g, u):
    return F.gelu(g, approximate="tanh") * u


def glu(g, u, gemma: bool):
    return geglu(g, u) if gemma else swiglu(g, u)


def swiglu_backward_(g, u, m, dm):
    """SwiGLU's gradients for gate and up, given its output m = silu(g) * u and m's gradient dm, written over m
    and dm (lora_gemm's prologue_backward: neither is read again), so the down projection's backward holds
    four (tokens x intermediate) tensors, not autograd's six (its m, dm and two new gradients beside gate and
    up): the QLoRA step's peak is in that backward."""
    wide = torch.promote_types(g.dtype, torch.float32)  # bf16 computes in fp32 (as autograd's kernel does)
    g32, dm32 = g.to(wide), dm.to(wide)
    s = torch.sigmoid(g32)
    m.copy_(dm32 * u.to(wide) * s * (1 + g32 * (1 - s)))  # silu'(g) = s (1 + g (1 - s))
    dm.copy_(dm32 * g32 * s)
    return m, dm


# The compiled regions: everything between the frozen GEMMs (which run as they are, or dequantise NF4).
def qkv_rope(x, ln1, eps, gemma: bool, ys, loras, cos, sin, heads: int, kv_heads: int, dropout: float,
              training: bool, *head_norms):
    """LoRA branches (A, B, scale) of q/k/v (or of the fused qkv) added to their frozen outputs `ys`, then RoPE:
    (batch, seq, heads, dim). The norm is recomputed here from x (which backward keeps anyway) so the normed copy
    need not be kept."""
    h = recomputed(rms_norm, x, ln1, eps, gemma)
    ys = [y + lora_branch(h, *lora, dropout, training) for y, lora in zip(ys, loras)]
    return rope(*split_qkv(ys, heads, kv_heads), cos, sin, heads, kv_heads, *head_norms)


def split_qkv(ys, heads: int, kv_heads: int):
    """q, k, v from the outputs of Layer.attention_inputs: as they are, or split from the fused qkv (Phi-3)."""
    if len(ys) == 3:
        return ys
    d = ys[0].shape[-1] // (heads + 2 * kv_heads)
    return ys[0].split([heads * d, kv_heads * d, kv_heads * d], -1)


def split_gate_up(ys):
    """gate, up from the outputs of Layer.mlp_inputs: as they are, or the halves of the fused gate_up (Phi-3)."""
    return ys if len(ys) == 2 else ys[0].chunk(2, -1)


def rope(q, k, v, cos, sin, heads: int, kv_heads: int, q_norm=None, k_norm=None, head_norm_eps: float = 0.0,
          gemma: bool = False):
    """RoPE over q and k, as (batch, seq, heads, dim); first, where given (Qwen3, Gemma 3: Layer.head_norms), an
    RMSNorm over each head of q and of k."""
    b, n, _ = q.shape
    q, k, v = q.view(b, n, heads, -1), k.view(b, n, kv_heads, -1), v.view(b, n, kv_heads, -1)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, head_norm_eps, gemma), rms_norm(k, k_norm, head_norm_eps, gemma)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def rotate(x, cos, sin):
    """RoPE over the first cos.shape[-1] dims of each head (all of them, or partial_rotary_factor's share, as
    Phi-4-mini); the rest pass as they are."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, tail = x[..., :r], x[..., r:]
    return torch.cat((head * cos + rotate_half(head) * sin, tail), -1)


def post_residual(x, y, post, eps, gemma: bool):
    """x + y, or (Gemma 2/3, `post` given) x + RMSNorm(y): a sublayer's output joining the residual stream."""
    return x + y if post is None else x + rms_norm(y, post, eps, gemma)


def attn_residual_norm(x, a, yo, ao, bo, so, ln2, eps, gemma: bool, post, dropout: float, training: bool):
    """o projection's LoRA + residual (through the post-attention norm where there is one), then the MLP's
    input norm."""
    x = post_residual(x, yo + lora_branch(a, ao, bo, so, dropout, training), post, eps, gemma)
    return x, rms_norm(x, ln2, eps, gemma)


def gate_up(x, ln2, eps, gemma: bool, ys, loras, dropout: float, training: bool):
    """Gate/up (or the fused gate_up) with their LoRA branches (norm recomputed from x, as in qkv_rope)."""
    h = recomputed(rms_norm, x, ln2, eps, gemma)
    return split_gate_up([y + lora_branch(h, *lora, dropout, training) for y, lora in zip(ys, loras)])


def mlp_residual(x, g, u, yd, ad, bd, sd, gemma: bool, post, eps, dropout: float, training: bool):
    """down projection's LoRA + residual (through the post-MLP norm where there is one); silu(g)*u (gelu for
    Gemma) is recomputed from g and u, kept anyway, so the (tokens x intermediate) product is not kept a second
    time."""
    return post_residual(x, yd + lora_branch(recomputed(glu, g, u, gemma), ad, bd, sd, dropout, training), post, eps,
                          gemma)
