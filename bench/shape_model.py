"""A randomly initialised Llama with the shape of a real model (default: Llama-2 7B) and tunelab's tiny
byte-level tokenizer, saved in bf16 Hugging Face format, for speed and memory benchmarks only.

    python bench/shape_model.py OUT_DIR [--shape 7b|tiny] [--device cuda]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

# Llama-2 7B's published dimensions; 'tiny' checks the script itself on a CPU in seconds.
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=2048),
}


def build(out: Path, shape: str, device: str) -> Path:
    import transformers

    from tunelab.data.templates import get_template, template_to_jinja
    from tunelab.model.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = template_to_jinja(get_template("llama2_chat"))
    dims = dict(SHAPES[shape])
    dims["vocab_size"] = max(dims["vocab_size"], len(tokenizer))  # rows beyond the tokenizer stay unused
    config = transformers.LlamaConfig(
        **dims, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 7B parameters is far quicker on a GPU
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    build(args.out, args.shape, args.device)
