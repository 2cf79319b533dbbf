"""Tiny models: real architectures and a real tokenizer that round-trips Chinese, loaded the standard way."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.model.load import resolve_model_path
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


def test_tokenizer_round_trips_chinese_and_markers(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for text in ["我是不要葱姜蒜大佬的小助手，内在是上海AI实验室书生·浦语的7B大模型哦", "Ünïcödé ✓ 🙂 tabs\tand\nnewlines"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    for marker in ("<eoa>", "<|im_end|>", "<eoh>"):
        assert len(tok.encode(marker, add_special_tokens=False)) == 1


def test_builtin_model_is_built_once(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    path = resolve_model_path("builtin:tiny-qwen2")
    stamp = (tmp_path / "models").stat().st_mtime_ns
    assert resolve_model_path("builtin:tiny-qwen2") == path
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "qwen2"
    with pytest.raises(UserError, match="builtin:tiny-llama"):
        resolve_model_path("builtin:tiny-gpt5")
    assert stamp
