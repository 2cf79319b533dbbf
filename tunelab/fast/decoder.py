"""The fast training forward for Llama-family decoders (the families of tunelab.fast.support: Llama, Mistral,
Qwen2, Qwen3, Phi-3), over the very parameters of the (PEFT-wrapped) Hugging Face model, so optimizer,
checkpoints and export are unchanged.

What it does differently from the plain path, and why:
* LoRA over frozen weights (the usual case): each group of projections that reads one input (q/k/v, o,
  gate/up, down) is one autograd node of GEMMs (tunelab.fast.lora_gemm): the LoRA product and the residual
  join the frozen output in the GEMM's epilogue, and the input gradient is built in one buffer instead of
  being summed by autograd; RMSNorm, RoPE and SwiGLU run compiled (torch.compile); LoRA dropout's masks are
  made again from a seed per projection and forward (tunelab.fast.dropout), so recomputation, offload and
  CUDA graphs run with dropout too;
* otherwise (a trainable base weight: full fine-tuning) the frozen GEMMs run as they are and everything between
  them (RMSNorm, the LoRA branches, RoPE, SwiGLU, the residual adds) runs in compiled regions that
  torch.compile fuses into few kernels; weights are passed in as arguments, so all layers share one compiled
  graph per region;
* packed samples use variable-length flash attention instead of a (tokens x tokens) mask (softcapped
  attention, Gemma 2's: flex_attention with a block mask, see tunelab.fast.attention);
* 4-bit (NF4) weights are dequantised right before their GEMM and again in backward, never kept, so at most
  one projection's bf16 weight exists at a time, with or without recomputation;
* the LM head and the loss run chunked (tunelab.fast.loss), never holding the full fp32 logits;
* activation checkpointing is per layer and partial (checkpoint_layers): layers that fit in memory keep
  their activations and skip the second forward; the recomputed layers' inputs and attention outputs may
  wait on the host (offload_checkpoints, tunelab.fast.offload); a recomputation skips the GEMMs whose output
  it never reads.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from tunelab.fast.attention import PackedLayout, attention, packed_layout, windowed
from tunelab.fast.dropout import Masks, add_dropped, dropped
from tunelab.fast.lora_gemm import project, recomputing
from tunelab.fast.loss import chunk_losses_and_grad, chunked_token_losses
from tunelab.fast.offload import HostStash, KeptOutputs, offloaded
from tunelab.fast.parts import Layer, decoder_core, layers_of, lm_head, norm_eps
from tunelab.fast.regions import (attn_residual_norm, frozen_projection, gate_up, geglu, lora_args,
                                  mlp_residual, post_residual, qkv_rope, rms_norm, rope, split_gate_up, split_qkv,
                                  swiglu, swiglu_backward_)
from tunelab.fast.support import support

# The forward's link to the host carries the recomputed layers' inputs, and what room it has left carries the
# gate/up outputs of some of them (FastDecoder.output_layers_for). Its room: the forward's FLOPs over this many
# FLOPs per byte the link moves in the same time: a Hopper card's forward FLOP rate over its pinned-copy rate,
# with a margin for the copies' uneven pace (the choice and its measurements: bench/RESULTS.md).
FLOP_PER_LINK_BYTE = 13_000
# The top recomputed layers whose units keep their inputs and attention outputs on the GPU, not on the host:
# their copies out would be the last of forward, still on their way when it ends, and their copies back the first
# that backward waits for. They hold that memory only until backward reaches them, early, while few LoRA
# gradients exist; one layer is faster at almost no cost in peak, a second costs more than it gains
# (bench/RESULTS.md). Only where gate/up outputs go to the host too, which fills the link: where none do,
# attention paces the step and a resident layer would only raise the peak.
RESIDENT_LAYERS = 1


def _marked_recomputation():
    """A checkpoint's (forward, recomputation) contexts: the latter lets the GEMM groups skip what it need not
    fill (lora_gemm.recomputing)."""
    return nullcontext(), recomputing()


def longrope_frequencies(rotary) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """LongRoPE's (short, long) inverse frequencies and the original context it switches at, from the model's
    own RoPE initialisation; None for any other RoPE type."""
    if getattr(rotary, "rope_type", None) != "longrope":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg, init = rotary.config, ROPE_INIT_FUNCTIONS["longrope"]
    original = (getattr(cfg, "rope_parameters", None) or {}).get("original_max_position_embeddings") or \
        cfg.original_max_position_embeddings
    device = rotary.inv_freq.device
    return init(cfg, device)[0], init(cfg, device, seq_len=original + 1)[0], original


class FastDecoder:
    """Per-token losses for a batch, computed the fast way over `model`'s own parameters."""

    def __init__(self, model, compile: bool = False, checkpointing: bool = True, checkpoint_layers: int = -1,
                 offload: bool = False):
        spec, reason = support(model)
        if reason:
            raise ValueError(f"fast path unsupported: {reason}")
        self.model = model
        core = decoder_core(model)
        self.core = core
        cfg = core.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = spec.attention_scale or self.head_dim ** -0.5
        self.gemma, self.logit_softcap = spec.gemma, spec.logit_softcap
        self.layers = layers_of(core, spec)
        self.longrope = longrope_frequencies(core.rotary_emb)
        # the shortest sliding window of any layer (check_window)
        self.window = min((L.window for L in self.layers if L.window), default=None)
        projections = [p for L in self.layers for p in L.projections()]
        for uid, p in enumerate(projections):
            p.uid = uid
        self.n_projections = len(projections)
        self.dropout = max(p.dropout for p in projections)
        # layers recomputed in backward: all (-1) or the first N; the rest keep their activations, which is
        # faster (no second forward) where memory allows
        n = len(self.layers)
        self.checkpointed = set(range(n if checkpoint_layers < 0 else min(n, checkpoint_layers))) \
            if checkpointing else set()
        # LoRA over frozen weights (the usual case): each group of projections is one autograd node of GEMMs
        # (fast.lora_gemm); otherwise compiled regions put the LoRA branches and dropout around the frozen GEMMs
        self.lora_gemms = not any(t.requires_grad for L in self.layers for t in L.base_parts())
        # whether a recomputation needs torch's random state replayed: the compiled regions' dropout does (and
        # then neither offload nor CUDA graphs can run); the GEMM groups make their masks again from seeds
        self.replays_rng = self.dropout > 0 and not self.lora_gemms
        self.stash: HostStash | None = None
        self.output_layers: list[int] = []
        self.use_host(offload)
        # packed rows vary in length: allow a dynamic-shape graph per region, and flex_attention (softcapped
        # layers on CUDA, compiled whatever `compile` says) a graph per shape
        if compile or spec.attention_softcap is not None:
            import torch._dynamo
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        wrap = torch.compile if compile else (lambda f: f)
        self.norm: Callable = wrap(rms_norm)
        self.rope: Callable = wrap(rope)
        self.qkv_rope: Callable = wrap(qkv_rope)
        self.attn_residual_norm: Callable = wrap(attn_residual_norm)
        self.gate_up: Callable = wrap(gate_up)
        self.swiglu: Callable = wrap(swiglu)
        self.geglu: Callable = wrap(geglu)
        self.post_residual: Callable = wrap(post_residual)
        self.swiglu_backward_: Callable = wrap(swiglu_backward_)
        self.mlp_residual: Callable = wrap(mlp_residual)
        self.dropped: Callable = wrap(dropped)
        self.add_dropped: Callable = wrap(add_dropped)
        self.loss_chunk: Callable = wrap(chunk_losses_and_grad)

    @contextmanager
    def adapters_off(self):
        """The base model alone for the block (a preference run's reference): every projection without its LoRA
        branch, which this forward reads from the projections rather than through PEFT's layers."""
        projections = [p for L in self.layers for p in L.projections()]
        saved = [(p.lora_a, p.lora_b) for p in projections]
        for p in projections:
            p.lora_a = p.lora_b = None
        try:
            yield
        finally:
            for p, (a, b) in zip(projections, saved):
                p.lora_a, p.lora_b = a, b

    def use_host(self, offload: bool, output_layers=()) -> None:
        """Whether the recomputed layers are recomputed from inputs (and attention outputs) that waited on the
        host (offload_checkpoints): only where layers are recomputed and no torch random state is replayed.
        `output_layers` (see output_layers_for): the layers whose gate/up outputs wait there too."""
        self.stash = HostStash() if offload and self.checkpointed and not self.replays_rng else None
        self.output_layers = sorted(output_layers) if self.stash is not None and self.lora_gemms else []
        if self.stash is not None:
            self.stash.resident = {u for i in self.resident_layers() for u in (2 * i, 2 * i + 1)}

    def resident_layers(self, outputs: bool | None = None) -> list[int]:
        """The recomputed layers whose units keep their inputs on the GPU (see RESIDENT_LAYERS), where gate/up
        outputs go to the host (`outputs`; by default, whether use_host sent some there)."""
        if not RESIDENT_LAYERS or not (bool(self.output_layers) if outputs is None else outputs):
            return []
        return sorted(self.checkpointed)[max(0, len(self.checkpointed) - RESIDENT_LAYERS):]

    def output_layers_for(self, tokens: int, count: int | None = None, element_size: int = 2) -> list[int]:
        """The recomputed layers whose gate/up outputs go to the host too, for batches of `tokens` tokens: as
        many as the link's room in forward carries (`count` overrides it), spread evenly so that their copies
        do not pile up. Their recomputation then skips the layer's two largest GEMMs (and their NF4
        dequantisation).

        Which layers may: not the top recomputed one, which has no unit above to fetch its outputs back early,
        nor those whose units stay on the GPU (RESIDENT_LAYERS), and none whose `up` output, fetched back while
        the layer above runs its backward, would raise the step's peak: that lies at the end of backward, when
        every layer's LoRA gradients exist, so a layer qualifies when the gradients of the layers below it, not
        made yet at that moment, outweigh its `up`."""
        if not self.lora_gemms or not self.checkpointed or self.layers[0].gate_up is not None:
            return []  # (a fused gate_up is one output: the host stash fetches gate and up apart)
        inter = self.core.config.intermediate_size
        if count is None:  # per token and layer: what the link moves while forward runs, less what it sends already
            room = max(0.0, self._link_bytes(tokens) - self._sent_bytes(element_size)) * len(self.checkpointed)
            count = int(room // (2 * element_size * inter))
        grads = sum(t.numel() * t.element_size() for t in self.layers[0].trainable())
        lowest = -(-tokens * inter * element_size // max(grads, 1)) - 1
        top = min(self.resident_layers(outputs=True), default=max(self.checkpointed))
        candidates = [i for i in sorted(self.checkpointed) if lowest <= i < top]
        count = min(count, len(candidates))
        return [candidates[(2 * j + 1) * len(candidates) // (2 * count)] for j in range(count)]

    def _link_bytes(self, tokens: int) -> float:
        """Bytes per token that the link to the host moves while one layer's forward runs, for sequences of
        `tokens` tokens: the layer's forward FLOPs per token (causal attention) over FLOP_PER_LINK_BYTE."""
        hidden, inter = self.core.config.hidden_size, self.core.config.intermediate_size
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        flops = 2 * (hidden * (2 * q_out + 2 * kv_out) + 3 * hidden * inter) + 2 * tokens * q_out
        return flops / FLOP_PER_LINK_BYTE

    def _sent_bytes(self, element_size: int = 2, outputs: bool = False) -> int:
        """Bytes per token that one recomputed layer sends to the host: its two units' inputs and its attention
        output in the compute dtype (`element_size` bytes: bf16), the attention's log-sum-exp in fp32, and with
        `outputs` its gate and up outputs."""
        cfg = self.core.config
        inputs = element_size * (2 * cfg.hidden_size + self.heads * self.head_dim) + 4 * self.heads
        return inputs + (element_size * 2 * cfg.intermediate_size if outputs else 0)

    def host_bytes(self, tokens: int, element_size: int = 2) -> int:
        """Pinned host memory that offload_checkpoints takes for a batch of `tokens` tokens (every batch shape
        gets buffers of its own): what each recomputed layer sends (_sent_bytes), with the gate and up outputs
        of output_layers."""
        outputs = self._sent_bytes(element_size, True) - self._sent_bytes(element_size)
        sending = len(self.checkpointed) - len(self.resident_layers())
        return tokens * (sending * self._sent_bytes(element_size) + len(self.output_layers) * outputs)

    def in_flight_bytes(self, tokens: int, seq: int, element_size: int = 2) -> int:
        """The sources of copies out that forward may leave in flight (HostStash.in_flight), for a batch of
        `tokens` tokens in sequences of `seq`: two layers' worth, counted in what the link moves in their
        forward where it is the slower, in what they send where the compute is. Held longer, they only raise
        the step's peak."""
        sent = self._sent_bytes(element_size, outputs=bool(self.output_layers))
        return int(2 * tokens * min(self._link_bytes(seq), sent))

    def masks(self, device) -> Masks | None:
        """This forward's LoRA dropout (new seeds), or None where nothing is dropped (no dropout, evaluation,
        or the compiled regions, which use torch's dropout)."""
        if not (self.dropout and self.lora_gemms and self.model.training):
            return None
        return Masks(Masks.draw(self.n_projections, device), self.dropped, self.add_dropped)

    def keep_nf4_scales(self, keep: bool) -> None:
        """Whether NF4 projections keep their double-quantised block scales dequantised in fp32 (memory
        for speed) or dequantise them at every GEMM, as bitsandbytes itself does. Eagerly the per-call
        Python of the latter paced the step; replayed in a CUDA graph it is one small kernel per GEMM."""
        for L in self.layers:
            for p in L.projections():
                p.keep_scales, p.offset = keep, None
                if not keep:
                    p.absmax = None
                    qs = getattr(p.base.weight, "quant_state", None)
                    if qs is not None and qs.nested:
                        # bitsandbytes keeps its 8-bit code table wherever it was first made (the CPU, if a
                        # CPU tensor was quantised first): the per-GEMM dequantisation reads device tensors only
                        device = p.base.weight.device
                        s2 = qs.state2
                        s2.code, s2.absmax, qs.offset = (t.to(device) for t in (s2.code, s2.absmax, qs.offset))
                        p.offset = float(qs.offset)  # read here, once: inside a captured graph it cannot be

    def _layer(self, x, cos, sin, L: Layer, layout: PackedLayout, masks: Masks | None):
        # the frozen GEMMs' inputs (h, m) are used in forward only (a frozen weight needs no input for its
        # backward); backward keeps x, g and u and recomputes h and m from them
        return self._mlp_half(*self._attention_half(x, cos, sin, L, layout, masks), L, masks)

    def _attention_half(self, x, cos, sin, L: Layer, layout: PackedLayout, masks: Masks | None,
                        unit: int | None = None):
        """x + attention(norm(x)), and its second norm (the MLP's input; None where the MLP half makes it).
        `masks`: this forward's LoRA dropout (GEMM groups). `unit`: the number of the offloaded unit this half
        is (None: part of a layer), whose attention output waits on the host and whose own output is not
        needed again."""
        def attend(q, k, v):
            # softcapped attention (flex_attention) has no kernel outputs the host stash keeps: an offloaded
            # unit runs it again in its recomputation
            if unit is None or L.softcap is not None:
                return attention(q, k, v, layout, self.scale, L.window, L.softcap)
            return self.stash.attention(unit, lambda *qkv: attention(*qkv, layout, self.scale, L.window), q, k, v)

        if self.lora_gemms:
            qkv = project(lambda t: self.norm(t, L.ln1, L.eps, L.gemma), (x,), L.attention_inputs(), masks=masks)
            qkv = split_qkv(qkv, self.heads, self.kv_heads)
            a = attend(*self.rope(*qkv, cos, sin, self.heads, self.kv_heads, *L.head_norms())).flatten(2)
            if L.post_attention is None:
                return project(None, (a,), (L.o,), residual=x, tail=unit is not None, masks=masks)[0], None
            y = project(None, (a,), (L.o,), masks=masks)[0]  # read by the norm after it: not a tail
            return self.post_residual(x, y, L.post_attention, L.eps, L.gemma), None
        tr, drop, lora = self.model.training, self.dropout, lora_args
        h = self.norm(x, L.ln1, L.eps, L.gemma)
        projs = L.attention_inputs()
        q, k, v = self.qkv_rope(x, L.ln1, L.eps, L.gemma, [frozen_projection(h, p) for p in projs], [lora(p) for p in projs],
                                cos, sin, self.heads, self.kv_heads, drop, tr, *L.head_norms())
        a = attend(q, k, v).flatten(2)
        return self.attn_residual_norm(x, a, frozen_projection(a, L.o), *lora(L.o), L.ln2, L.eps, L.gemma, L.post_attention,
                                       drop, tr)

    def _mlp_half(self, x, h, L: Layer, masks: Masks | None, unit: int | None = None, kept: bool = False):
        """x + MLP(h), h = norm(x) (made here when None: an offloaded half starts from x alone). `kept`: this
        offloaded unit's gate/up outputs wait on the host (output_layers), fetched back one (gate) and two (up)
        units early."""
        if self.lora_gemms:
            outputs = KeptOutputs(self.stash, unit, (unit + 1, unit + 2)) if kept else None
            g, u = split_gate_up(project(lambda t: self.norm(t, L.ln2, L.eps, L.gemma), (x,), L.mlp_inputs(),
                                          masks=masks, kept=outputs))
            if not L.gemma:
                return project(self.swiglu, (g, u), (L.down,), residual=x, tail=True, masks=masks,
                               prologue_backward=self.swiglu_backward_)[0]
            if L.post_mlp is None:
                return project(self.geglu, (g, u), (L.down,), residual=x, tail=True, masks=masks)[0]
            y = project(self.geglu, (g, u), (L.down,), masks=masks)[0]
            return self.post_residual(x, y, L.post_mlp, L.eps, True)
        tr, drop, lora = self.model.training, self.dropout, lora_args
        if h is None:
            h = self.norm(x, L.ln2, L.eps, L.gemma)
        projs = L.mlp_inputs()
        g, u = self.gate_up(x, L.ln2, L.eps, L.gemma, [frozen_projection(h, p) for p in projs], [lora(p) for p in projs], drop,
                            tr)
        m = self.geglu(g, u) if L.gemma else self.swiglu(g, u)
        return self.mlp_residual(x, g, u, frozen_projection(m, L.down), *lora(L.down), L.gemma, L.post_mlp, L.eps, drop, tr)

    def layout(self, segment_ids, position_ids, device, dtype: torch.dtype) -> PackedLayout:
        """Where the batch's samples lie (see attention.packed_layout); from CPU ids this needs no GPU sync."""
        self.check_window(position_ids)
        use_varlen = torch.device(device).type == "cuda" and dtype != torch.float32
        return packed_layout(segment_ids, use_varlen, device)

    def check_window(self, position_ids) -> None:
        """A sliding window (Mistral) longer than every sample is plain causal attention; a shorter one needs an
        attention that can apply it (attention.windowed: the masked reference always can, varlen where this
        PyTorch's takes window_size; softcapped layers run flex_attention or the reference, which always can)."""
        if self.window and int(position_ids.max()) + 1 > self.window and self.layers[0].softcap is None and \
                not windowed(self.core.embed_tokens.weight.device):
            raise ValueError("fast path: samples longer than the sliding window, which this PyTorch's varlen "
                             "attention cannot apply")

    def rope_tables(self, x, position_ids, kind: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin for these positions, by the model's own rotary embedding; LongRoPE's (Phi-3.5) as
        it computes them, from its frequencies (longrope_frequencies). LongRoPE takes its long factors where the
        batch reaches past the original context, its short ones otherwise. Some transformers versions make that
        choice with a Python comparison (a GPU sync, which a CUDA graph capture forbids) and swap the buffer a
        captured graph would read, so here it is made on the device, between frequencies this decoder keeps."""
        rotary = self.core.rotary_emb
        if self.longrope is None:
            return rotary(x, position_ids) if kind is None else rotary(x, position_ids, kind)
        short, long, original = self.longrope
        inv_freq = torch.where(position_ids.max() + 1 > original, long.to(x.device), short.to(x.device))
        freqs = position_ids[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), -1)
        return angles.cos() * rotary.attention_scaling, angles.sin() * rotary.attention_scaling

    def hidden_states(self, input_ids, position_ids, dtype: torch.dtype, layout: PackedLayout) -> torch.Tensor:
        """Final-norm hidden states (batch, seq, dim)."""
        core = self.core
        x = core.embed_tokens(input_ids).to(dtype)
        if self.gemma and not hasattr(core.embed_tokens, "embed_scale"):  # older transformers scale it in the model
            x = x * torch.tensor(core.config.hidden_size ** 0.5, dtype=dtype)
        # RoPE's cos and sin: one pair, or (Gemma 3) one per kind of layer
        ropes = {kind: tuple(t.to(dtype) for t in self.rope_tables(x, position_ids, kind))
                 for kind in {L.rope_kind for L in self.layers}}
        masks = self.masks(x.device)  # given to each layer and to its recomputation alike
        if self.stash is not None:
            self.stash.in_flight = self.in_flight_bytes(x.shape[0] * x.shape[1], x.shape[1], x.element_size())
        for i, L in enumerate(self.layers):
            cos, sin = ropes[L.rope_kind]
            if i in self.checkpointed and torch.is_grad_enabled():
                if self.stash is not None:
                    # two offloaded units per layer, attention (2i) and MLP (2i+1): a layer's backward then
                    # holds one half's activations at a time, not both (the MLP's input goes to the host too)
                    attn = lambda t, L=L, u=2 * i, cs=(cos, sin): self._attention_half(  # noqa: E731
                        t, *cs, L, layout, masks, u)[0]
                    mlp = lambda t, L=L, u=2 * i + 1, k=i in self.output_layers: self._mlp_half(  # noqa: E731
                        t, None, L, masks, u, k)
                    below, params = (2 * i - 1 if i - 1 in self.checkpointed else None), L.trainable()
                    x = offloaded(self.stash, 2 * i, below, attn, x, params)
                    x = offloaded(self.stash, 2 * i + 1, 2 * i, mlp, x, params)
                else:
                    # only the compiled regions' dropout has random state to replay (and saving it is not
                    # allowed while a CUDA graph is captured)
                    x = checkpoint(self._layer, x, cos, sin, L, layout, masks, use_reentrant=False,
                                   preserve_rng_state=self.replays_rng, context_fn=_marked_recomputation)
            else:
                x = self._layer(x, cos, sin, L, layout, masks)
        if self.stash is not None:  # the copies still on their way out: their sources go before the loss's memory comes
            self.stash.flush()
        return rms_norm(x, core.norm.weight, norm_eps(core.norm), self.gemma)

    def token_losses(self, batch: dict[str, torch.Tensor], dtype: torch.dtype,
                     layout: PackedLayout | None = None) -> torch.Tensor:
        """Per-token cross entropy (0 where the target is ignored), shape (batch, seq). A batch may come still on
        the CPU: its layout is worked out there (no GPU sync) and its tensors move to the model's device."""
        device = self.core.embed_tokens.weight.device
        if layout is None:
            layout = self.layout(batch["segment_ids"], batch["position_ids"], device, dtype)
        batch = {k: v.to(device) for k, v in batch.items()}
        h = self.hidden_states(batch["input_ids"], batch["position_ids"], dtype, layout)
        head = lm_head(self.model)
        weight = head.weight if head.weight.dtype == dtype else head.weight.to(dtype)
        targets = batch["targets"]
        losses = chunked_token_losses(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1),
                                      softcap=self.logit_softcap, elementwise=self.loss_chunk)
        return losses.view(targets.shape)
