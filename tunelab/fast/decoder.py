"""The fast training forward for Llama-family decoders (Llama, Mistral, Qwen2, InternLM 1 style), over the
very parameters of the (PEFT-wrapped) Hugging Face model, so optimizer, checkpoints and export are unchanged.

What it does differently from the plain path, and why:
* each decoder layer runs as two compiled regions around the attention call (RMSNorm, the projections with
  their LoRA branches, RoPE, SwiGLU and the residual adds fused by torch.compile into few kernels), with the
  same weights passed in as arguments so all layers share one compiled graph;
* packed samples use variable-length flash attention instead of a (tokens x tokens) mask;
* 4-bit (NF4) weights are dequantised inside the layer, which is recomputed in the backward pass, so at most
  one layer's bf16 weights exist at a time;
* the LM head and the loss run chunked (tunelab.fast.loss), never holding the full fp32 logits;
* activation checkpointing is per layer (non-reentrant); only each layer's input is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.fast.attention import PackedLayout, attention, packed_layout
from tunelab.fast.loss import chunked_token_losses


@dataclass
class Proj:
    """A projection: frozen base weight (plain or 4-bit), optional bias, optional LoRA branch."""
    base: torch.nn.Module
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scale: float = 1.0
    dropout: float = 0.0

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.base.weight
        quant_state = getattr(w, "quant_state", None)
        if quant_state is not None:  # bitsandbytes Params4bit
            import bitsandbytes.functional as bnbf
            return bnbf.dequantize_4bit(w.data, quant_state).to(dtype)
        return w if w.dtype == dtype else w.to(dtype)


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    gate: Proj
    up: Proj
    down: Proj


def _proj(module) -> Proj:
    base = getattr(module, "base_layer", module)
    p = Proj(base, base.bias)
    lora_a = getattr(module, "lora_A", None)
    if lora_a is not None and len(lora_a):
        name = module.active_adapters[0]
        p.lora_a, p.lora_b = lora_a[name].weight, module.lora_B[name].weight
        p.scale = float(module.scaling[name])
        drop = module.lora_dropout[name]
        p.dropout = float(getattr(drop, "p", 0.0))
    return p


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run this model (None when it can)."""
    core = _core(model)
    if core is None or not hasattr(core, "layers") or not hasattr(core, "embed_tokens"):
        return "not a Llama-family decoder (model.layers / embed_tokens)"
    cfg = core.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (SwiGLU with silu only)"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and \
            getattr(cfg, "model_type", "") == "mistral":
        return None  # sliding windows longer than the sequence are plain causal: checked per batch
    layer = core.layers[0]
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
        obj = layer
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            return f"layer has no {path}"
    weight = getattr(layer.self_attn.q_proj, "base_layer", layer.self_attn.q_proj).weight
    if weight.dtype == torch.int8 or type(weight).__name__ == "Int8Params":
        return "8-bit weights"
    return None


def _core(model):
    """The inner decoder (LlamaModel) of a causal LM, through a PEFT wrapper if there is one."""
    m = model
    for _ in range(4):
        if hasattr(m, "layers") and hasattr(m, "embed_tokens"):
            return m
        nxt = getattr(m, "model", None) or getattr(m, "base_model", None)
        if nxt is None or nxt is m:
            return None
        m = nxt
    return None


def _lm_head(model):
    m = model
    for _ in range(4):
        head = getattr(m, "lm_head", None)
        if head is not None:
            return head
        m = getattr(m, "base_model", None) or getattr(m, "model", None)
    raise ValueError("no lm_head")


def _rms_norm(x, weight, eps):
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x32.to(dtype)).to(dtype)  # as HF computes it, then in the compute dtype


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _lora_linear(x, w, bias, a, b, scale, dropout, training):
    y = F.linear(x, w, bias)
    if a is not None:
        xa = F.dropout(x, dropout, training) if dropout else x
        y = y + F.linear(F.linear(xa, a.to(x.dtype)), b.to(x.dtype)) * scale
    return y


def _attn_in(x, cos, sin, ln1, eps, wq, bq, aq, bq_, sq, wk, bk, ak, bk_, sk, wv, bv, av, bv_, sv,
             heads: int, kv_heads: int, dropout: float, training: bool):
    """RMSNorm, q/k/v projections (with LoRA) and RoPE: (batch, seq, heads, dim) tensors."""
    b, n, _ = x.shape
    h = _rms_norm(x, ln1, eps)
    q = _lora_linear(h, wq, bq, aq, bq_, sq, dropout, training).view(b, n, heads, -1)
    k = _lora_linear(h, wk, bk, ak, bk_, sk, dropout, training).view(b, n, kv_heads, -1)
    v = _lora_linear(h, wv, bv, av, bv_, sv, dropout, training).view(b, n, kv_heads, -1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q, k, v


def _attn_out_mlp(x, a, wo, bo, ao, bo_, so, ln2, eps, wg, bg, ag, bg_, sg, wu, bu, au, bu_, su,
                  wd, bd, ad, bd_, sd, dropout: float, training: bool):
    """o projection + residual, RMSNorm, SwiGLU MLP (with LoRA) + residual."""
    b, n = x.shape[:2]
    x = x + _lora_linear(a.reshape(b, n, -1), wo, bo, ao, bo_, so, dropout, training)
    h = _rms_norm(x, ln2, eps)
    g = _lora_linear(h, wg, bg, ag, bg_, sg, dropout, training)
    u = _lora_linear(h, wu, bu, au, bu_, su, dropout, training)
    return x + _lora_linear(F.silu(g) * u, wd, bd, ad, bd_, sd, dropout, training)


class FastDecoder:
    """Per-token losses for a batch, computed the fast way over `model`'s own parameters."""

    def __init__(self, model, compile: bool = False, checkpointing: bool = True):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"fast path unsupported: {reason}")
        self.model = model
        core = _core(model)
        self.core = core
        cfg = core.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        self.window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        self.layers = []
        for layer in core.layers:
            sa, mlp = layer.self_attn, layer.mlp
            eps = getattr(layer.input_layernorm, "variance_epsilon", None) or layer.input_layernorm.eps
            self.layers.append(Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, eps,
                                     _proj(sa.q_proj), _proj(sa.k_proj), _proj(sa.v_proj), _proj(sa.o_proj),
                                     _proj(mlp.gate_proj), _proj(mlp.up_proj), _proj(mlp.down_proj)))
        self.dropout = max(p.dropout for L in self.layers for p in (L.q, L.k, L.v, L.o, L.gate, L.up, L.down))
        self.checkpointing = checkpointing
        self.attn_in: Callable = _attn_in
        self.attn_out_mlp: Callable = _attn_out_mlp
        if compile:
            self.attn_in = torch.compile(_attn_in, dynamic=False)
            self.attn_out_mlp = torch.compile(_attn_out_mlp, dynamic=False)

    def _layer(self, x, cos, sin, L: Layer, layout: PackedLayout):
        dt = x.dtype
        tr = self.model.training

        def args(p: Proj):
            return (p.weight(dt), p.bias, p.lora_a, p.lora_b, p.scale)

        q, k, v = self.attn_in(x, cos, sin, L.ln1, L.eps, *args(L.q), *args(L.k), *args(L.v),
                               self.heads, self.kv_heads, self.dropout, tr)
        a = attention(q, k, v, layout, self.scale)
        return self.attn_out_mlp(x, a, *args(L.o), L.ln2, L.eps, *args(L.gate), *args(L.up), *args(L.down),
                                 self.dropout, tr)

    def hidden_states(self, input_ids, position_ids, segment_ids, dtype: torch.dtype) -> torch.Tensor:
        """Final-norm hidden states (batch, seq, dim)."""
        core = self.core
        x = core.embed_tokens(input_ids).to(dtype)
        cos, sin = core.rotary_emb(x, position_ids)
        cos, sin = cos.to(dtype), sin.to(dtype)
        if self.window and int(position_ids.max()) + 1 > self.window:
            raise ValueError("fast path: samples longer than the sliding window")
        layout = packed_layout(segment_ids, use_varlen=x.is_cuda and dtype != torch.float32)
        for L in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._layer, x, cos, sin, L, layout, use_reentrant=False)
            else:
                x = self._layer(x, cos, sin, L, layout)
        norm = core.norm
        return _rms_norm(x, norm.weight, getattr(norm, "variance_epsilon", None) or norm.eps)

    def token_losses(self, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Per-token cross entropy (0 where the target is ignored), shape (batch, seq)."""
        h = self.hidden_states(batch["input_ids"], batch["position_ids"], batch["segment_ids"], dtype)
        head = _lm_head(self.model)
        weight = head.weight if head.weight.dtype == dtype else head.weight.to(dtype)
        targets = batch["targets"]
        losses = chunked_token_losses(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1))
        return losses.view(targets.shape)
