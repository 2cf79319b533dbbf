"""Tiny models for the demo and the tests: real transformers architectures with random weights and a real
byte-level BPE tokenizer (any text, Chinese included, round-trips), saved in Hugging Face format.

`builtin:tiny-<arch>` in pretrained_model_name_or_path builds one on first use under $TUNELAB_HOME
(default ~/.cache/tunelab). Real work points pretrained_model_name_or_path at a real model instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from tunelab.fsutil import atomic_dir
from tunelab.data.loading import BUILTIN_DATA

VERSION = 2  # bump whenever the build changes, so stale cached models are not reused
# arch -> (transformers config class name, extra config, family chat template)
ARCHS = {
    "llama": ("LlamaConfig", {}, "llama2_chat"),
    "qwen2": ("Qwen2Config", {}, "qwen_chat"),
    "mistral": ("MistralConfig", {"sliding_window": None}, "mistral"),
    # Ministral: Mistral with a window on the layers its layer_types mark 'sliding_attention'
    "ministral": ("MinistralConfig", {"head_dim": 32, "sliding_window": 24,
                                      "layer_types": ["sliding_attention", "full_attention"]},
                  "mistral"),
    "qwen3": ("Qwen3Config", {"head_dim": 48}, "qwen_chat"),  # head_dim != hidden / heads, per-head q/k norms
    "phi3": ("Phi3Config", {"head_dim": 48}, "phi3_chat"),  # fused qkv_proj and gate_up_proj
    "internlm": ("LlamaConfig", {"attention_bias": True}, "internlm_chat"),  # InternLM 1: Llama + qkvo bias
    "internlm3": ("InternLM3Config", {"head_dim": 48}, "internlm2_chat"),  # Llama in transformers
    # Gemma: (1 + w) norms, GeGLU, scaled embedding, head_dim 48; Gemma 2/3: post-sublayer norms, a sliding
    # window on the first layer of two (transformers' 'sliding_attention' kind); Gemma 3: q/k norms, RoPE per kind
    "gemma": ("GemmaConfig", {"head_dim": 48}, "gemma"),
    "gemma2": ("Gemma2Config", {"head_dim": 48, "query_pre_attn_scalar": 32, "sliding_window": 24,
                                "layer_types": ["sliding_attention", "full_attention"]}, "gemma"),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 48, "query_pre_attn_scalar": 32, "sliding_window": 24,
                                    "layer_types": ["sliding_attention", "full_attention"],
                                    "rope_parameters": {"sliding_attention": {"rope_type": "default",
                                                                              "rope_theta": 10000.0},
                                                        "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                           "rope_theta": 1000000.0}}}, "gemma"),
}
MARKERS = ["<|im_start|>", "<|im_end|>", "<|System|>", "<|User|>", "<|Bot|>", "<eoh>", "<eoa>", "<eosys>",
           "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]

_CORPUS = """\
A tokenizer turns text into numbers. Fine-tuning teaches a pretrained language model a new behaviour from a
small dataset: who it is, how it answers, which tools it calls. LoRA trains two small matrices beside each
frozen weight; QLoRA does the same over a base stored in four bits. The quick brown fox jumps over the lazy
dog. What is the capital of France? Paris. 1 + 1 = 2; 12 * 7 = 84. Please tell me five scenic spots in Shanghai.
微调让一个预训练的语言模型从一个小数据集中学会新的行为。请给我介绍五个上海的景点。你好，我是你的助手。
上海人工智能实验室发布了书生浦语大模型。今天天气很好，我们一起去公园散步吧。医生建议按时吃药，多喝水。
"""


def tunelab_home() -> Path:
    return Path(os.environ.get("TUNELAB_HOME", Path.home() / ".cache" / "tunelab"))


def resolve_builtin_model(name_or_path: str) -> str:
    """Map builtin:tiny-<arch> to its local folder (building it once); other values pass through."""
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    key = name_or_path.split(":", 1)[1]
    arch = key.removeprefix("tiny-")
    if not key.startswith("tiny-") or arch not in ARCHS:
        from tunelab.errors import UserError
        raise UserError(f"'{name_or_path}': no such built-in model; valid: "
                        + ", ".join(f"builtin:tiny-{a}" for a in ARCHS))
    target = tunelab_home() / "models" / f"tiny-{arch}-v{VERSION}"
    if not (target / "config.json").exists():
        build_tiny_model(target, arch)
    return str(target)


# The bundled data the tokenizer learns from: only what it learnt when VERSION was set, so that bundling another
# file (the preference demo's) leaves every tiny model's tokens as they were
TOKENIZER_DATA = ("self_cognition",)


def _corpus() -> list[str]:
    lines = _CORPUS.splitlines()
    for path in (BUILTIN_DATA[key] for key in TOKENIZER_DATA):
        lines += Path(path).read_text(encoding="utf-8").splitlines()
    return lines * 4


def build_tokenizer(vocab_size: int = 1024, markers: list[str] | None = None):
    """A byte-level BPE tokenizer trained on a small built-in corpus, as a transformers fast tokenizer. Its
    special tokens are every family's markers, or only `markers` (a one-family vocabulary, as real models
    have, for the template-fit tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab.config.templates import TEMPLATES

    specials = ["<s>", "</s>", "<pad>"]
    every_family = MARKERS + [w for t in TEMPLATES.values() for w in t.stop_words]
    for word in every_family if markers is None else markers:
        if word not in specials:
            specials.append(word)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=specials[3:], clean_up_tokenization_spaces=False)


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 128, layers: int = 2, **over):
    """The transformers config of a tiny `arch` model (ARCHS), with `over` set on top of it."""
    import transformers

    config_cls, extra = ARCHS[arch][:2]
    values = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2 + 64,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.1)
    return getattr(transformers, config_cls)(**{**values, **extra, **over})


def build_tiny_model(target: Path | str, arch: str = "llama", hidden_size: int = 128, layers: int = 2,
                     seed: int = 0, markers: list[str] | None = None, chat_template: str | None = None) -> Path:
    """Write a tiny random model + tokenizer of the given architecture to `target` (atomically); `markers` and
    `chat_template` replace the tokenizer's special tokens (build_tokenizer) and its family chat template."""
    import transformers

    from tunelab.config.templates import get_template, template_to_jinja

    target = Path(target)
    tokenizer = build_tokenizer(markers=markers)
    tokenizer.chat_template = chat_template or template_to_jinja(get_template(ARCHS[arch][2]))
    config = tiny_config(arch, len(tokenizer), hidden_size, layers, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
