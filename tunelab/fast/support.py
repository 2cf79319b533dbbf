"""Which models the fast path runs, by allowlist: a model type whose parity test exists and passes
(tests/test_fast_parity.py), built by transformers' own modeling code, with every config field that changes the
math one the fast path handles. Anything else gets a one-line reason and runs the plain path. Decided without
importing the fast path's kernels.

A family lists every field of its config class (beside the generic ones) with the check that its value is one
the fast path computes right; a field the class has but the family does not list (a newer transformers adding
one) is a reason too, so an upgrade cannot change the math unseen."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tunelab.fast.parts import decoder_core

# RoPE types whose parity test passes (the model's own rotary_emb computes them; tests/test_fast_parity.py)
TESTED_ROPE = ("default", "linear", "llama3", "yarn")

# Fields that every family reads the same way, or not at all in a training forward
GENERIC_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    # PretrainedConfig's own
    "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "id2label", "is_encoder_decoder",
    "label2id", "model_type", "output_attentions", "output_hidden_states", "problem_type", "return_dict",
    "transformers_version",
})


@dataclass(frozen=True)
class Spec:
    """What a supported model's layers compute beyond a Llama layer (nothing, for Llama itself)."""
    family: str
    window: int | None = None  # Mistral: every layer attends to the last `window` tokens only
    # Gemma 2/3: the layers of kind 'sliding_attention' attend to the last `window` tokens, the others to all;
    # Gemma 3 also gives each kind its own RoPE (rope_parameters keyed by kind)
    layer_kinds: tuple[str, ...] | None = None
    rope_per_kind: bool = False
    gemma: bool = False  # RMSNorm scales by (1 + w) in fp32; GeGLU (tanh) instead of SwiGLU
    attention_scale: float | None = None  # query_pre_attn_scalar ** -0.5 (default: head_dim ** -0.5)
    logit_softcap: float | None = None  # Gemma 2: logits = cap * tanh(logits / cap)
    attention_softcap: float | None = None  # Gemma 2: attention scores = cap * tanh(scores / cap)


Check = Callable[[object], "str | None"]  # a config -> why the fast path cannot compute it (None: it can)


def _swiglu(cfg) -> str | None:
    act = getattr(cfg, "hidden_act", "silu")
    return None if act == "silu" else f"hidden_act {act!r} (the fast path computes SwiGLU with silu)"


def _geglu(name: str) -> Check:
    def check(cfg) -> str | None:
        act = getattr(cfg, name, None)
        return None if act in ("gelu_pytorch_tanh", "gelu_tanh") else \
            f"{name} {act!r} (the fast path computes Gemma's GeGLU with tanh-approximated gelu)"
    return check


def _none(name: str, why: str) -> Check:
    def check(cfg) -> str | None:
        value = getattr(cfg, name, None)
        return None if value in (None, False) else f"{name} {value!r} ({why})"
    return check


def _gemma_rope(cfg) -> str | None:
    """RoPE of every kind of layer (Gemma 3 keys rope_parameters by layer kind) is a tested type."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if set(params) <= {"sliding_attention", "full_attention"} and params:
        return next(filter(None, (_rope_reason(kind, 1.0) for kind in params.values())), None)
    return _tested_rope(cfg)


def _layer_kinds(cfg) -> str | None:
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    extra = kinds - {"full_attention", "sliding_attention"}
    return f"layer types {sorted(extra)} (the fast path has full and sliding-window attention)" if extra else None


def _tested_rope(cfg, tested: tuple[str, ...] = TESTED_ROPE, partial_ok: bool = False) -> str | None:
    return _rope_reason(getattr(cfg, "rope_parameters", None) or {}, getattr(cfg, "partial_rotary_factor", 1.0),
                        tested, partial_ok)


def _phi3_rope(cfg) -> str | None:
    """Phi-3.5 and Phi-4-mini: LongRoPE and (Phi-4-mini) RoPE over part of each head, both applied by Phi-3's
    own attention and computed the same way by the fast path (parity rows phi3.5 and phi4-mini)."""
    return _tested_rope(cfg, TESTED_ROPE + ("longrope",), partial_ok=True)


def _rope_reason(params: dict, partial_default, tested: tuple[str, ...] = TESTED_ROPE,
                 partial_ok: bool = False) -> str | None:
    """Why the fast path cannot compute RoPE of these rope_parameters (None: it can)."""
    kind = params.get("rope_type", "default")
    if kind not in tested:
        return f"rope type {kind!r} (tested: {', '.join(tested)})"
    partial = params.get("partial_rotary_factor", partial_default)
    if partial not in (None, 1.0) and not partial_ok:
        return f"partial_rotary_factor {partial} (the fast path rotates whole heads of this model type)"
    return None


def _layer_windows(cfg) -> dict:
    """Spec of a model whose layer_types mark the layers that attend through the sliding window (Ministral;
    Qwen2/Qwen3 with use_sliding_window, from max_window_layers on; Gemma 2/3); the others attend to every token."""
    kinds = getattr(cfg, "layer_types", None)
    return {"window": getattr(cfg, "sliding_window", None) if kinds else None,
            "layer_kinds": tuple(kinds) if kinds else None}


def _no_dropout(name: str) -> Check:
    def check(cfg) -> str | None:
        p = getattr(cfg, name, 0.0) or 0.0
        return None if p == 0 else f"{name} {p} (the fast path drops nothing but LoRA inputs)"
    return check


def _handled(cfg) -> None:
    return None


_COMMON: dict[str, Check] = {"hidden_act": _swiglu, "attention_dropout": _no_dropout("attention_dropout"),
                             "rope_parameters": _tested_rope}
# Qwen2 and Qwen3 slide their window over some layers only when use_sliding_window says so (layer_types)
_QWEN_WINDOW: dict[str, Check] = {"layer_types": _layer_kinds, "use_sliding_window": _handled,
                                  "sliding_window": _handled, "max_window_layers": _handled}


@dataclass(frozen=True)
class Family:
    core: str  # transformers' decoder class (LlamaModel): remote code of the same model type is not it
    fields: dict[str, Check]
    modules: tuple[str, ...] = ()  # each layer's modules that the fast path reads (default: Llama's)
    spec: Callable[[object], dict] = field(default=lambda cfg: {})


_NORMS = ("input_layernorm", "post_attention_layernorm")
_LLAMA_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj") + _NORMS

# Llama 2/3/3.1/3.2 (and InternLM 1 converted to Llama with q/k/v/o biases): biases read from the modules
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaModel", {**_COMMON, "attention_bias": _handled, "mlp_bias": _handled,
                                   "pretraining_tp": _handled}),  # transformers 5 no longer reads pretraining_tp
    "mistral": Family("MistralModel", {**_COMMON, "sliding_window": _handled},
                      spec=lambda cfg: {"window": getattr(cfg, "sliding_window", None)}),
    # Ministral: Mistral's window on the layers of kind 'sliding_attention' only (layer_types)
    "ministral": Family("MinistralModel", {**_COMMON, "sliding_window": _handled, "layer_types": _layer_kinds},
                        spec=_layer_windows),
    "qwen2": Family("Qwen2Model", {**_COMMON, **_QWEN_WINDOW}, spec=_layer_windows),  # q/k/v biases
    "qwen3": Family("Qwen3Model", {**_COMMON, **_QWEN_WINDOW, "attention_bias": _handled},
                    modules=_LLAMA_MODULES + ("self_attn.q_norm", "self_attn.k_norm"),  # per-head norms
                    spec=_layer_windows),
    # Phi-3/3.5/4: fused qkv_proj and gate_up_proj (LoRA on them as PEFT names them); a sliding window on every
    # layer where the config sets one; LongRoPE (its original_max_position_embeddings), partial rotary
    "phi3": Family("Phi3Model", {**_COMMON, "rope_parameters": _phi3_rope, "sliding_window": _handled,
                                 "original_max_position_embeddings": _handled,
                                 "resid_pdrop": _no_dropout("resid_pdrop"), "embd_pdrop": _no_dropout("embd_pdrop")},
                   modules=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj") + _NORMS,
                   spec=lambda cfg: {"window": getattr(cfg, "sliding_window", None)}),
}


# Gemma 1/2/3 text: (1 + w) RMSNorm, GeGLU (tanh), the embedding scaled by sqrt(hidden) (inside the embedding
# module), tied embeddings; Gemma 2/3 add norms after attention and after the MLP, query_pre_attn_scalar, and
# sliding-window layers by layer_types; Gemma 2 softcaps the attention scores (fast.attention: flex_attention on
# CUDA) and the final logits; Gemma 3 has per-head q/k norms and a RoPE per layer kind
_GEMMA = {"attention_bias": _handled, "attention_dropout": _no_dropout("attention_dropout"),
          "use_bidirectional_attention": _none("use_bidirectional_attention", "the fast path is causal")}
_GEMMA2_NORMS = _LLAMA_MODULES + ("pre_feedforward_layernorm", "post_feedforward_layernorm")
_GEMMA_LATER = {**_GEMMA, "hidden_activation": _geglu("hidden_activation"), "query_pre_attn_scalar": _handled,
                "sliding_window": _handled, "layer_types": _layer_kinds, "final_logit_softcapping": _handled}


def _gemma_spec(cfg, rope_per_kind: bool = False) -> dict:
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    return {"gemma": True, **_layer_windows(cfg), "rope_per_kind": rope_per_kind,
            "attention_scale": scalar ** -0.5 if scalar else None,
            "logit_softcap": getattr(cfg, "final_logit_softcapping", None),
            "attention_softcap": getattr(cfg, "attn_logit_softcapping", None)}


FAMILIES.update({
    "gemma": Family("GemmaModel", {**_GEMMA, "hidden_act": _geglu("hidden_act"), "rope_parameters": _tested_rope},
                    spec=_gemma_spec),
    "gemma2": Family("Gemma2Model", {**_GEMMA_LATER, "rope_parameters": _tested_rope,
                                     "attn_logit_softcapping": _handled},
                     modules=_GEMMA2_NORMS, spec=_gemma_spec),
    "gemma3_text": Family("Gemma3TextModel", {**_GEMMA_LATER, "rope_parameters": _gemma_rope,
                                              "attn_logit_softcapping": _none("attn_logit_softcapping", "the fast "
                                                                              "path softcaps Gemma 2's attention only"),
                                              "_sliding_window_pattern": _handled},
                          modules=_GEMMA2_NORMS + ("self_attn.q_norm", "self_attn.k_norm"),
                          spec=lambda cfg: _gemma_spec(cfg, rope_per_kind=True)),
    # InternLM 3 is Llama in transformers (its own config class, LlamaModel)
    "internlm3": Family("LlamaModel", {**_COMMON, "attention_bias": _handled, "mlp_bias": _handled}),
})


# Text-and-image models whose language model the fast path trains on text: those with a parity row
TESTED_TEXT_AND_IMAGE = ("gemma3",)


def support(model) -> tuple[Spec | None, str | None]:
    """(what the fast path computes for `model`, None), or (None, why it cannot run it, in one line)."""
    core = decoder_core(model)
    if core is None:
        return None, "not a decoder with model.layers and embed_tokens"
    cfg = core.config
    kind = getattr(cfg, "model_type", None)
    outer = getattr(getattr(model, "config", None), "model_type", None)
    if getattr(model, "config", cfg) is not cfg and outer not in TESTED_TEXT_AND_IMAGE:
        return None, (f"the language model of a {outer!r} text-and-image model (tested: "
                      f"{', '.join(TESTED_TEXT_AND_IMAGE)})")
    family = FAMILIES.get(kind)
    if family is None:
        return None, f"model type {kind!r} has no parity test on the fast path (it runs {', '.join(FAMILIES)})"
    cls = type(core)
    if cls.__name__ != family.core or not cls.__module__.startswith("transformers.models."):
        return None, f"{cls.__module__}.{cls.__name__} is not transformers' own {family.core} (remote code)"
    unreviewed = sorted(set(type(cfg)().to_dict()) - GENERIC_FIELDS - set(family.fields))
    if unreviewed:
        return None, f"{type(cfg).__name__} has fields the fast path was not checked against: {unreviewed}"
    for name, check in family.fields.items():
        reason = check(cfg)
        if reason is not None:
            return None, reason
    reason = _modules_reason(core, model, family.modules or _LLAMA_MODULES)
    if reason is not None:
        return None, reason
    return Spec(kind, **family.spec(cfg)), None


def targets_reason(model, targets) -> str | None:
    """Why LoRA on `targets` (lora_target_modules, before PEFT adds it) would take the fast path's model off it:
    a name that is not one of the layer modules it reads (the output head, the embedding) or a pattern."""
    if targets == "all-linear":  # PEFT leaves the output head out
        return None
    if isinstance(targets, str):
        return f"lora_target_modules {targets!r} is a pattern (the fast path takes 'all-linear' or a list of names)"
    family = FAMILIES.get(getattr(getattr(decoder_core(model), "config", None), "model_type", None))
    read = {path.rsplit(".", 1)[-1] for path in (family.modules or _LLAMA_MODULES)} if family else set()
    other = [name for name in targets if name not in read]
    return f"LoRA on {other}, modules the fast path does not read" if other else None


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run this model (None when it can)."""
    return support(model)[1]


def _modules_reason(core, model, paths: tuple[str, ...]) -> str | None:
    """Whether every layer has the modules the fast path reads, in weights it reads, and LoRA only on those."""
    read, first = set(), None
    for layer in core.layers:
        for path in paths:
            obj = layer
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                return f"layer has no {path}"
            read.add(id(obj))
            first = obj if first is None else first
    weight = getattr(first, "base_layer", first).weight
    if weight.dtype == torch.int8 or type(weight).__name__ == "Int8Params":
        return "8-bit weights"
    for name, module in model.named_modules():
        if getattr(module, "lora_magnitude_vector", None):  # PEFT's DoRA: a weight-norm term per output
            return f"DoRA adapter on {name} (the fast path computes plain LoRA; the plain path runs DoRA)"
        if getattr(module, "lora_A", None) and id(module) not in read:
            return f"LoRA on {name}, a module the fast path does not read"
    return None
