"""Acceptance (issue 33, points 1-3): a trained tiny model as GGUF reads back through transformers' GGUF loader
with the merged model's logits, token ids and chat template; llama.cpp itself answers with the trained answer;
the Ollama Modelfile's TEMPLATE, run by Go's text/template, renders tunelab's prompt."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_cli

pytest.importorskip("gguf")

MIXED = "Fine-tuning 微调 teaches a model 新的行为: who it is, 你是谁? 1 + 1 = 2."
# q8_0 keeps 8 bits per weight with one scale per 32: on these tiny random-weight models the largest logit moves
# by about 0.15 of logits up to about 5 (measured 0.13 for Llama, 0.17 for Qwen2); the bound leaves room
Q8_0_BOUND = 0.3


def _train_demo(work: Path, base: Path, **over):
    from tunelab.config.loader import load_config
    from tunelab.train.loop import train

    values = dict(pretrained_model_name_or_path=str(base), evaluation_inputs=["who are you"], evaluation_freq=1000,
                  evaluation_max_new_tokens=2, **over)
    cfg, name = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])
    return train(cfg, name, work_dir=str(work)).work_dir / "hf"


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A demo-style LoRA adapter, briefly trained, for the tiny Llama and the tiny Qwen2 (ChatML template)."""
    root = tmp_path_factory.mktemp("gguf_train")
    return {"llama": _train_demo(root / "llama", tiny_models["llama"], max_steps=3),
            "qwen2": _train_demo(root / "qwen2", tiny_models["qwen2"], max_steps=3, prompt_template="qwen_chat",
                                 SYSTEM="You are tunelab's assistant.")}


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_reads_back_as_the_merged_model(arch, tiny_models, adapters, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from gguf import GGUFReader

    from tunelab.data.encode import PromptFormat
    from tunelab.data.turns import Turn
    from tunelab.export.gguf import to_gguf

    adapter = adapters[arch]
    merged = tmp_path / "merged"
    cp = run_cli("convert", "merge", tiny_models[arch], adapter, merged)
    assert cp.returncode == 0, cp.stderr[-2000:]
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = tokenizer(MIXED).input_ids
    want = _logits(reference, ids)
    # Llama goes base + --adapter (merged on the fly), Qwen2 from the merged folder
    source = [tiny_models[arch], "--adapter", adapter] if arch == "llama" else [merged]
    cp = run_cli("convert", "gguf", *source, tmp_path / "model-f32.gguf", "--outtype", "f32")
    assert cp.returncode == 0, cp.stderr[-2000:]
    for outtype in ("f32", "f16", "q8_0"):
        out = tmp_path / f"model-{outtype}.gguf"
        if outtype != "f32":  # the same code in this process, for time
            to_gguf(str(source[0]), str(out), str(adapter) if arch == "llama" else None, outtype)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
        got = _logits(model, ids)
        if outtype == "f32":
            assert (got - want).abs().max() < 1e-3
        elif outtype == "f16":  # the merged model with its weights in float16, as the file holds them
            half = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float16).float()
            assert (got - _logits(half, ids)).abs().max() < 1e-3
        else:
            assert (got - want).abs().max() < Q8_0_BOUND

    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model-f16.gguf")
    assert gguf_tokenizer(MIXED, add_special_tokens=False).input_ids == ids
    # llama.cpp starts a text with bos where the trained format does (internlm_chat yes, qwen_chat no)
    assert gguf_tokenizer(MIXED).input_ids == ([tokenizer.bos_token_id] if arch == "llama" else []) + ids
    meta = json.loads((adapter / "tunelab.json").read_text())
    fmt = PromptFormat(tokenizer, meta["prompt_template"], meta["SYSTEM"])
    turns = [Turn("你好", "I am tunelab's assistant."), Turn("who are you", "")]
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "I am tunelab's assistant."},
                {"role": "user", "content": "who are you"}]
    assert gguf_tokenizer.apply_chat_template(messages, tokenize=False) == fmt.text(turns, open_last=True)

    fields = GGUFReader(tmp_path / "model-f16.gguf").fields
    value = lambda key: fields[key].contents()  # noqa: E731
    end_of_turn = {"llama": "<eoa>", "qwen2": "<|im_end|>"}[arch]  # internlm_chat's and ChatML's turn end
    assert value("tokenizer.ggml.eot_token_id") == tokenizer.convert_tokens_to_ids(end_of_turn)
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert value("tokenizer.ggml.add_bos_token") is (arch == "llama")  # qwen_chat starts without bos
    assert value("tokenizer.ggml.model") == "gpt2"  # byte-level BPE, split as GPT-2 / Qwen2 split text
    assert value("tokenizer.ggml.pre") == {"llama": "gpt-2", "qwen2": "qwen2"}[arch]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_other_families_read_back(arch, tmp_path):
    """Mistral (llama.cpp's 'llama') and Qwen3 (q/k norms). Qwen3's head_dim is 128 here, as in every published
    Qwen3, because transformers' GGUF loader reads no attention.key_length and takes Qwen3Config's default
    (llama.cpp reads the key, which the file holds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.export.gguf import to_gguf
    from tunelab.model.tiny import build_tiny_model

    build_tiny_model(tmp_path / arch, arch)
    if arch == "qwen3":
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(tmp_path / arch, head_dim=128)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / arch)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / arch, dtype=torch.float32)
    to_gguf(str(tmp_path / arch), str(tmp_path / "m.gguf"), outtype="f32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = list(range(3, 40))
    assert (_logits(model, ids) - _logits(reference, ids)).abs().max() < 1e-3


def _sentencepiece_style_tokenizer():
    """A tokenizer laid out as Llama 2's tokenizer.json: BPE with byte fallback, spaces as '▁', no pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab.model.tiny import _corpus

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=1200, show_progress=False,
                                                           special_tokens=["<unk>", "<s>", "</s>", *bytes_]))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.slow
def test_sentencepiece_style_tokenizer_reads_back(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from gguf import GGUFReader

    from tunelab.export.gguf import to_gguf
    from tunelab.model.tiny import tiny_config

    tokenizer = _sentencepiece_style_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer), bos_token_id=1, eos_token_id=2))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    to_gguf(str(tmp_path), str(tmp_path / "m.gguf"), outtype="f32")
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and fields["tokenizer.ggml.pre"].contents() == "default"
    scores = fields["tokenizer.ggml.scores"].contents()
    assert scores[300] > scores[301] > scores[900]  # merge order, which llama.cpp reads from the scores
    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ids = tokenizer(MIXED).input_ids
    assert read_back.tokenize(MIXED) == tokenizer.tokenize(MIXED) and read_back(MIXED).input_ids[-len(ids):] == ids
    gguf_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert (_logits(gguf_model, ids) - _logits(model, ids)).abs().max() < 1e-3


def test_gguf_bad_outtype_and_missing_quantiser(tiny_llama, tmp_path, capsys):
    from tunelab.cli import main

    assert main(["convert", "gguf", str(tiny_llama), str(tmp_path / "m.gguf"), "--outtype", "q9_x"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "tunelab: error: --outtype 'q9_x': not a GGUF type; use f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 "
        "(written directly), or a type of llama.cpp's quantiser such as q4_k_m, q5_k_m, q6_k (needs llama-quantize "
        "on PATH or llama-cpp-python)"]
    assert not list(tmp_path.iterdir())
    if shutil.which("llama-quantize") is None and _missing("llama_cpp"):
        assert main(["convert", "gguf", str(tiny_llama), str(tmp_path / "m.gguf"), "--outtype", "q4_k_m"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            "tunelab: error: --outtype q4_k_m: the gguf package writes f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, "
            "q5_1; q4_k_m needs llama.cpp's quantiser (llama-quantize on PATH, or pip install llama-cpp-python)"]
        assert not list(tmp_path.iterdir())
    (tmp_path / "qwen2_moe").mkdir()  # an architecture llama.cpp names differently: refused before loading weights
    (tmp_path / "qwen2_moe" / "config.json").write_text(json.dumps({"model_type": "qwen2_moe"}))
    assert main(["convert", "gguf", str(tmp_path / "qwen2_moe"), str(tmp_path / "m.gguf")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "tunelab: error: convert gguf: model type 'qwen2_moe' is not supported yet (supported: llama, mistral, "
        "qwen2, qwen3)"]
    assert not (tmp_path / "m.gguf").exists()


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


# -- Ollama --------------------------------------------------------------------------------------------

GO_RENDERER = Path(__file__).parent / "go" / "render_template.go"


def _render_with_go(cases: list[dict]) -> list[str]:
    done = subprocess.run(["go", "run", str(GO_RENDERER)], input=json.dumps(cases), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go)")
def test_modelfile_template_renders_tunelab_prompt_in_go():
    """Every built-in template: Ollama's TEMPLATE, executed by Go's text/template as Ollama does, gives
    tunelab's prompt for a two-turn conversation with a system text (Ollama adds the bos token itself)."""
    from tunelab.config.templates import TEMPLATES
    from tunelab.data.encode import PromptFormat
    from tunelab.data.turns import Turn
    from tunelab.export.ollama import go_template
    from tunelab.model.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    system, answer = 'Answer briefly, "quoted" {braces}.', "Hi!\nA second line."
    turns = [Turn("你好 {input}", answer, system=system), Turn("who are you", "")]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "你好 {input}"},
                {"role": "assistant", "content": answer}, {"role": "user", "content": "who are you"}]
    names = sorted(TEMPLATES)
    got = _render_with_go([{"template": go_template(TEMPLATES[n], tokenizer.eos_token), "messages": messages}
                           for n in names])
    for name, text in zip(names, got):
        want = PromptFormat(tokenizer, name).text(turns, open_last=True)
        if TEMPLATES[name].bos:
            want = want.removeprefix(tokenizer.bos_token)
        assert text == want, name


def test_modelfile_lines(tiny_models, tmp_path):
    from tunelab.config.templates import get_template
    from tunelab.export.ollama import go_template, modelfile

    text = modelfile("model.gguf", get_template("internlm_chat"), "You are Tuney.", "</s>")
    assert text == ("FROM ./model.gguf\n"
                    f'TEMPLATE """{go_template(get_template("internlm_chat"), "</s>")}"""\n'
                    'SYSTEM """You are Tuney."""\n'
                    'PARAMETER stop "<eoa>"\n')
    llama2 = modelfile("m.gguf", get_template("llama2_chat"), "", "</s>")  # eos ends each answer: a stop word
    assert llama2.splitlines()[-1] == 'PARAMETER stop "</s>"' and "SYSTEM" not in llama2
