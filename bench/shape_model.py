"""A randomly initialised model with the shape of a real one (default: Llama-2 7B) and tunelab's tiny byte-level
tokenizer, saved in bf16 Hugging Face format, for speed and memory benchmarks only.

    python bench/shape_model.py OUT_DIR [--shape llama2-7b|llama3-8b|qwen2.5-7b|qwen3-8b|gemma2-9b|phi3.5-mini|
                                                 phi4-mini|tiny] [--device cuda]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

# name -> (transformers config class, the model's published dimensions and the fields that change its math:
# vocabulary, GQA, head_dim, RoPE base, norms' epsilon, biases (Qwen2 always has q/k/v biases), softcapping,
# tied embeddings). 'tiny' checks the scripts themselves on a CPU in seconds.
SHAPES = {
    "llama2-7b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                      rms_norm_eps=1e-5)),
    "llama3-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                      rms_norm_eps=1e-5, rope_theta=500000.0)),
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                       rms_norm_eps=1e-6, rope_theta=1000000.0)),
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                     rms_norm_eps=1e-6, rope_theta=1000000.0)),
    "gemma2-9b": ("Gemma2Config", dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                       vocab_size=256000, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                                       sliding_window=4096, attn_logit_softcapping=50.0,
                                       final_logit_softcapping=30.0, tie_word_embeddings=True)),
    # Phi-3.5-mini and Phi-4-mini: LongRoPE switching at 4,096 positions (factor lists of the published length,
    # their values 1: they do not change the speed), Phi-4-mini's RoPE over 3/4 of each head
    "phi3.5-mini": ("Phi3Config", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                       rms_norm_eps=1e-5, sliding_window=262144, original_max_position_embeddings=4096,
                                       rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                            original_max_position_embeddings=4096,
                                                            short_factor=[1.0] * 48, long_factor=[1.0] * 48))),
    "phi4-mini": ("Phi3Config", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                     num_attention_heads=24, num_key_value_heads=8, vocab_size=200064,
                                     rms_norm_eps=1e-5, sliding_window=262144, original_max_position_embeddings=4096,
                                     tie_word_embeddings=True,
                                     rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                          partial_rotary_factor=0.75,
                                                          original_max_position_embeddings=4096,
                                                          short_factor=[1.0] * 48, long_factor=[1.0] * 48))),
    "tiny": ("LlamaConfig", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=2048)),
}
SHAPES["7b"] = SHAPES["llama2-7b"]  # the name earlier commands in bench/RESULTS.md use
TEMPLATES = {"LlamaConfig": "llama2_chat", "Qwen2Config": "qwen_chat", "Qwen3Config": "chatml",
             "Gemma2Config": "gemma", "Phi3Config": "phi3_chat"}


def config_of(shape: str, vocab_size: int | None = None, **ids):
    """The transformers config of `shape`, its vocabulary at least `vocab_size` (rows beyond a tokenizer stay
    unused), positions for the longest benchmark case (32,768 tokens)."""
    import transformers

    cls, dims = SHAPES[shape]
    dims = {"tie_word_embeddings": False, **dims, "max_position_embeddings": 32768, **ids}
    if vocab_size:
        dims["vocab_size"] = max(dims["vocab_size"], vocab_size)
    theta = dims.pop("rope_theta", None)
    config = getattr(transformers, cls)(**dims)
    if theta is not None:  # transformers 5 keeps it in rope_parameters
        if isinstance(getattr(config, "rope_parameters", None), dict):
            config.rope_parameters["rope_theta"] = theta
        else:
            config.rope_theta = theta
    return config


def build(out: Path, shape: str, device: str) -> Path:
    import transformers

    from tunelab.config.templates import get_template, template_to_jinja
    from tunelab.model.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = template_to_jinja(get_template(TEMPLATES[SHAPES[shape][0]]))
    config = config_of(shape, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialising billions of parameters is far quicker on a GPU
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    print(f"{out}: {shape}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    build(args.out, args.shape, args.device)
