"""The parts of a Llama-family decoder as the fast path reads them: its projections (frozen weight, plain or
NF4, optional bias, optional LoRA branch) and layers, found through a PEFT wrapper, over the model's own
parameters, so that training them trains the model. Whether the fast path can run a model at all is decided in
tunelab.fast.support."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.fast import nf4


@dataclass
class Proj:
    """A projection: frozen base weight (plain or 4-bit), optional bias, optional LoRA branch."""
    base: torch.nn.Module
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scale: float = 1.0
    dropout: float = 0.0
    uid: int = 0  # its number in the model (which of a forward's dropout seeds is its own)

    absmax: torch.Tensor | None = None  # NF4: the fp32 block scales, dequantised once (double quantisation)
    keep_scales: bool = True  # keep `absmax` (see FastDecoder.keep_nf4_scales)
    offset: float | None = None  # NF4, scales not kept: the double quantisation's offset, read once

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.base.weight
        qs = getattr(w, "quant_state", None)
        if qs is None:
            return w if w.dtype == dtype else w.to(dtype)
        own_kernel = w.is_cuda and qs.quant_type == "nf4" and nf4.usable(w.device)
        if own_kernel and self.absmax is None and self.offset is not None:
            return nf4.dequantize(w.data, qs, dtype, offset=self.offset)  # both levels of scales in one pass
        absmax = self.absmax
        if absmax is None:
            absmax = qs.absmax
            if qs.nested:
                s2 = qs.state2
                absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                    qs.absmax, s2.absmax, s2.code, s2.blocksize, torch.float32) + qs.offset
            if self.keep_scales:
                self.absmax = absmax
        if own_kernel:
            return nf4.dequantize(w.data, qs, dtype, scales=absmax)
        return torch.ops.bitsandbytes.dequantize_4bit.default(w.data, absmax, qs.blocksize, qs.quant_type,
                                                              qs.shape, dtype)


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    q: Proj | None  # None where q/k/v are one fused projection (qkv)
    k: Proj | None
    v: Proj | None
    o: Proj
    gate: Proj | None  # None where gate/up are one fused projection (gate_up)
    up: Proj | None
    down: Proj
    q_norm: torch.Tensor | None = None  # Qwen3: RMSNorm weights over each head of q and k
    k_norm: torch.Tensor | None = None
    head_norm_eps: float = 0.0
    qkv: Proj | None = None  # Phi-3: q, k and v in one weight (PEFT puts one LoRA branch on it), in that order
    gate_up: Proj | None = None  # Phi-3: gate and up in one weight, halves in that order
    post_attention: torch.Tensor | None = None  # Gemma 2/3: RMSNorm weights over the attention's and the MLP's
    post_mlp: torch.Tensor | None = None  # outputs, before each joins the residual stream
    gemma: bool = False  # Gemma's RMSNorm, (1 + w) in fp32, and GeGLU (see support.Spec)
    window: int | None = None  # this layer attends to the last `window` tokens only
    softcap: float | None = None  # Gemma 2: this layer's attention scores are softcapped (support.Spec)
    rope_kind: str | None = None  # Gemma 3: the layer kind whose RoPE this layer takes

    def attention_inputs(self) -> tuple[Proj, ...]:
        """The projections that read the attention's normed input: q, k, v (or the fused qkv)."""
        return (self.qkv,) if self.qkv is not None else (self.q, self.k, self.v)

    def mlp_inputs(self) -> tuple[Proj, ...]:
        """The projections that read the MLP's normed input: gate, up (or the fused gate_up)."""
        return (self.gate_up,) if self.gate_up is not None else (self.gate, self.up)

    def projections(self) -> tuple[Proj, ...]:
        return (*self.attention_inputs(), self.o, *self.mlp_inputs(), self.down)

    def head_norms(self) -> tuple:
        """What RoPE takes for the per-head norms of q and k: () where the layer has none."""
        return () if self.q_norm is None else (self.q_norm, self.k_norm, self.head_norm_eps, self.gemma)

    def base_parts(self) -> list[torch.Tensor]:
        """The norm weights, base weights and biases (frozen under LoRA; trainable in full fine-tuning)."""
        norms = [t for t in (self.ln1, self.ln2, self.q_norm, self.k_norm, self.post_attention, self.post_mlp)
                 if t is not None]
        return norms + [t for p in self.projections() for t in (p.base.weight, p.bias) if t is not None]

    def trainable(self) -> list[torch.Tensor]:
        """The layer's parameters that train (LoRA; everything in full fine-tuning)."""
        lora = [t for p in self.projections() for t in (p.lora_a, p.lora_b) if t is not None]
        return [t for t in self.base_parts() + lora if t.requires_grad]


def proj_of(module) -> Proj:
    """A (PEFT-wrapped) linear module as a Proj over its own parameters (its active adapter's LoRA)."""
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


def layers_of(core, spec=None) -> list[Layer]:
    """The decoder layers of `core` (decoder_core's), as the fast path reads them; `spec` (support.Spec) says
    what they compute beyond a Llama layer."""
    layers = []
    for i, layer in enumerate(core.layers):
        sa, mlp = layer.self_attn, layer.mlp
        optional = lambda m, name: proj_of(getattr(m, name)) if hasattr(m, name) else None  # noqa: E731
        # Gemma 2/3 name the MLP's input norm pre_feedforward_layernorm; their post_attention_layernorm normalises
        # the attention's output
        pre_mlp = getattr(layer, "pre_feedforward_layernorm", None)
        L = Layer(layer.input_layernorm.weight, (pre_mlp or layer.post_attention_layernorm).weight,
                  norm_eps(layer.input_layernorm),
                  optional(sa, "q_proj"), optional(sa, "k_proj"), optional(sa, "v_proj"), proj_of(sa.o_proj),
                  optional(mlp, "gate_proj"), optional(mlp, "up_proj"), proj_of(mlp.down_proj),
                  qkv=optional(sa, "qkv_proj"), gate_up=optional(mlp, "gate_up_proj"))
        if pre_mlp is not None:
            L.post_attention, L.post_mlp = layer.post_attention_layernorm.weight, layer.post_feedforward_layernorm.weight
        if getattr(sa, "q_norm", None) is not None:
            L.q_norm, L.k_norm, L.head_norm_eps = sa.q_norm.weight, sa.k_norm.weight, norm_eps(sa.q_norm)
        if spec is not None:
            kind = spec.layer_kinds[i] if spec.layer_kinds else None
            L.gemma = spec.gemma
            L.window = spec.window if spec.layer_kinds is None or kind == "sliding_attention" else None
            L.rope_kind = kind if spec.rope_per_kind else None
            L.softcap = spec.attention_softcap
        layers.append(L)
    return layers


def decoder_core(model):
    """The inner decoder (LlamaModel) of a causal LM, through a PEFT wrapper if there is one; of a text-and-image
    model (Gemma 3 from 4B on), its language model."""
    m = model
    for _ in range(5):
        if hasattr(m, "layers") and hasattr(m, "embed_tokens"):
            return m
        nxt = getattr(m, "model", None) or getattr(m, "language_model", None) or getattr(m, "base_model", None)
        if nxt is None or nxt is m:
            return None
        m = nxt
    return None


def lm_head(model):
    """The output projection of a causal LM, through a PEFT wrapper if there is one."""
    m = model
    for _ in range(4):
        head = getattr(m, "lm_head", None)
        if head is not None:
            return head
        m = getattr(m, "base_model", None) or getattr(m, "model", None)
    raise ValueError("no lm_head")


def norm_eps(norm: torch.nn.Module) -> float:
    """An RMSNorm's epsilon, whichever name its class gives it."""
    return getattr(norm, "variance_epsilon", None) or norm.eps
