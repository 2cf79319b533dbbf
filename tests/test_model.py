"""Tiny models: real architectures and a real tokenizer that round-trips Chinese, loaded the standard way."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.model.load import load_model, resolve_model_path
from tunelab.errors import UserError


@pytest.mark.parametrize("arch,model_type", [("llama", "llama"), ("qwen2", "qwen2"), ("mistral", "mistral"),
                                             ("internlm", "llama")])
def test_tiny_models_load_with_auto_classes(tiny_models, arch, model_type):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    assert model.config.model_type == model_type
    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    ids = torch.tensor([tok.encode("你好 hello", add_special_tokens=False)])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    if arch == "internlm":
        assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_softcapped_attention_loads_with_eager_attention(tiny_models, caplog):
    """Gemma 2 softcaps its attention scores. Hugging Face's eager attention applies the cap; its sdpa attention,
    the default for Gemma 2 in transformers 5.17 (the GPU machine's), left it out without a word, so training and
    chat computed another model. load_model asks for eager attention for such a model, says so, and leaves
    every other model its own default."""
    import logging

    with caplog.at_level(logging.INFO, logger="tunelab"):
        gemma2 = load_model(str(tiny_models["gemma2"]), dtype=torch.float32, device="cpu")
    assert gemma2.config.attn_logit_softcapping is not None
    assert gemma2.config._attn_implementation == "eager"
    assert any("attention: eager" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunelab"):
        llama = load_model(str(tiny_models["llama"]), dtype=torch.float32, device="cpu")
    assert llama.config._attn_implementation == AutoModelForCausalLM.from_pretrained(
        tiny_models["llama"]).config._attn_implementation
    assert not any("attention: eager" in r.getMessage() for r in caplog.records)


def test_attention_implementation_reads_a_text_and_image_models_text_config():
    """A text-and-image config (Gemma 3 from 4B on) keeps attn_logit_softcapping in its text config: eager
    attention where that text config softcaps, the default where it does not."""
    import transformers

    from tunelab.model.load import attention_implementation

    def wrapped(cap):
        return transformers.Gemma3Config(text_config=dict(attn_logit_softcapping=cap))

    assert attention_implementation(wrapped(50.0)) == "eager"
    assert attention_implementation(wrapped(None)) is None


def test_tokenizer_round_trips_chinese_and_markers(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for text in ["我是不要葱姜蒜大佬的小助手，内在是上海AI实验室书生·浦语的7B大模型哦", "Ünïcödé ✓ 🙂 tabs\tand\nnewlines"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    for marker in ("<eoa>", "<|im_end|>", "<eoh>"):
        assert len(tok.encode(marker, add_special_tokens=False)) == 1


def test_builtin_model_is_built_once(monkeypatch, tmp_path):
    """The first use builds the model under TUNELAB_HOME; later ones find it there and build nothing."""
    from tunelab.model import tiny

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    path = resolve_model_path("builtin:tiny-qwen2")
    stamp = (Path(path) / "config.json").stat().st_mtime_ns

    def build_again(*args, **kwargs):
        raise AssertionError("built a second time")
    monkeypatch.setattr(tiny, "build_tiny_model", build_again)
    assert resolve_model_path("builtin:tiny-qwen2") == path
    assert (Path(path) / "config.json").stat().st_mtime_ns == stamp
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "qwen2"
    with pytest.raises(UserError, match="builtin:tiny-llama"):
        resolve_model_path("builtin:tiny-gpt5")


def test_qlora_training_is_unchanged_by_an_evaluation_forward(tiny_llama):
    """A forward in eval mode without gradients (an evaluation during training) leaves a QLoRA model's 4-bit
    weights as they were: bitsandbytes would repack them for its CPU inference kernel (on a CPU with
    AVX512-BF16), after which its training forward gives other losses and wrong gradients, and the fast path
    dequantises garbage. Losses and LoRA gradients after the evaluation equal those before, on both paths."""
    from test_fast import _batch, _cfg, _losses_and_grads, _wake_lora_b
    from tunelab.fast.decoder import FastDecoder
    from tunelab.model.load import add_lora, load_model
    from tunelab.model.losses import token_losses

    cfg = _cfg(tiny_llama, algorithm="qlora")
    model = add_lora(load_model(str(tiny_llama), dtype=torch.float32, bits=4, device="cpu"), cfg, quantized=True,
                     prepare=False).train()
    _wake_lora_b(model)
    fast = FastDecoder(model, compile=False)
    batch = _batch(model.config.vocab_size, [[40, 25, 30], [60, 20]])
    paths = {"plain": lambda b: token_losses(model, b, torch.float32),
             "fast": lambda b: fast.token_losses(b, torch.float32)}
    before = {k: _losses_and_grads(model, fn, batch) for k, fn in paths.items()}
    model.eval()
    with torch.no_grad():
        token_losses(model, batch, torch.float32)
    model.train()
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not getattr(weight.quant_state, "packing_format_for_cpu", False)
    for k, fn in paths.items():
        losses, grads = _losses_and_grads(model, fn, batch)
        torch.testing.assert_close(losses, before[k][0], atol=1e-6, rtol=0, msg=k)
        for name, g in grads.items():
            torch.testing.assert_close(g, before[k][1][name], atol=1e-7, rtol=1e-5, msg=f"{k} {name}")
