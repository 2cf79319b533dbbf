"""The configured prompt_template against the model's own chat format (issue 28, point 5 and acceptance 4), and
the new families' templates against their published chat templates (point 6).

A "ChatML model" here is a tiny real Qwen2 whose tokenizer holds only ChatML's special tokens (as Qwen's does)
and carries Qwen3's published chat_template."""
from __future__ import annotations

import json

import pytest
from published_chat_templates import GEMMA3, MISTRAL_V03, PHI4, QWEN3

from conftest import edit_config, run_cli
from tunelab.data.template_fit import check_template_fit, matching_templates
from tunelab.config.templates import TEMPLATES, template_to_jinja
from tunelab.errors import ConfigError

CHATML_MARKERS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def _tokenizer(markers: list[str], chat_template: str | None):
    from tunelab.model.tiny import build_tokenizer

    tok = build_tokenizer(markers=markers)
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def chatml_tokenizer():
    return _tokenizer(CHATML_MARKERS, QWEN3)


# -- the rule, on real tokenizers ---------------------------------------------------------------------

def test_internlm_template_on_a_chatml_tokenizer_is_refused_in_one_line(chatml_tokenizer):
    with pytest.raises(ConfigError) as err:
        check_template_fit(chatml_tokenizer, "internlm_chat", "Qwen/Qwen3-0.6B")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'internlm_chat'" in msg and "Qwen/Qwen3-0.6B" in msg and "<eoa>" in msg
    assert "<|im_start|>" in msg  # the tokenizer's own format, shown
    assert "prompt_template = 'auto'" in msg and "'qwen3'" in msg and "prompt_template_check = False" in msg


@pytest.mark.parametrize("name", ["llama3_chat", "gemma3", "phi3_chat", "default", "llama2_chat"])
def test_other_families_on_a_chatml_tokenizer_are_refused(chatml_tokenizer, name):
    with pytest.raises(ConfigError, match=f"'{name}' does not fit"):
        check_template_fit(chatml_tokenizer, name, "m")


@pytest.mark.parametrize("name", ["qwen3", "chatml", "qwen_chat", "internlm2_chat"])
def test_chatml_templates_match_a_chatml_tokenizer(chatml_tokenizer, name):
    assert check_template_fit(chatml_tokenizer, name, "m").verdict == "match"


def test_matching_templates_are_the_chatml_family(chatml_tokenizer):
    from tunelab.data.template_fit import _tokenizer_rendering

    names = matching_templates(chatml_tokenizer, _tokenizer_rendering(chatml_tokenizer))
    assert {"chatml", "qwen3", "qwen_chat", "yi_chat"} <= set(names)
    assert not {"internlm_chat", "llama3_chat", "phi4", "gemma3"} & set(names)


def test_check_off_keeps_the_template_with_a_warning(chatml_tokenizer):
    fit = check_template_fit(chatml_tokenizer, "internlm_chat", "m", check=False)
    assert fit.verdict == "conflict" and fit.message.startswith("warning:") and "on purpose" in fit.message


def test_a_base_tokenizer_never_conflicts():
    base = _tokenizer(CHATML_MARKERS, None)
    fit = check_template_fit(base, "internlm_chat", "m")
    assert fit.verdict == "base" and "no chat_template" in fit.message


def test_auto_is_always_the_tokenizers_own(chatml_tokenizer):
    assert check_template_fit(chatml_tokenizer, "auto", "m").verdict == "auto"


def test_known_markers_in_another_layout_train_with_a_log_line():
    # the built-in tiny tokenizers hold every family's markers: InternLM's format on the tiny Llama (whose
    # chat_template is Llama-2's) is said, not refused
    every = _tokenizer(None, template_to_jinja(TEMPLATES["llama2_chat"]))
    fit = check_template_fit(every, "internlm_chat", "m")
    assert fit.verdict == "differs" and "[INST]" in fit.message


@pytest.mark.parametrize("name, markers, published", [
    ("qwen3", CHATML_MARKERS, QWEN3),
    ("gemma3", ["<start_of_turn>", "<end_of_turn>"], GEMMA3),
    ("phi4", ["<|im_start|>", "<|im_sep|>", "<|im_end|>"], PHI4),
    ("mistral_v3", ["[INST]", "[/INST]"], MISTRAL_V03),
])
def test_each_new_family_fits_its_own_published_template(name, markers, published):
    assert check_template_fit(_tokenizer(markers, published), name, "m").verdict == "match"


# -- the new families' templates render as published --------------------------------------------------

def _render(chat_template: str, msgs, bos: str, eos: str, generation: bool = False, **extra) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    out, _ = render_jinja_template(conversations=[msgs], chat_template=chat_template, bos_token=bos,
                                   eos_token=eos, add_generation_prompt=generation, **extra)
    return out[0]


SYSTEM, TWO_TURNS = "You are brief.", [("Hi", "Hello"), ("Bye", "Goodbye")]


def _messages(turns, system=None, open_last=False):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, (user, answer) in enumerate(turns):
        msgs.append({"role": "user", "content": user})
        if not (open_last and i == len(turns) - 1):
            msgs.append({"role": "assistant", "content": answer})
    return msgs


# name -> (published template, bos, eos, whether the published one keeps a system text in a finished dialogue)
FAMILIES = {
    "qwen3": (QWEN3, "", "<|im_end|>", True),
    "gemma3": (GEMMA3, "<bos>", "<eos>", True),
    "phi4": (PHI4, "<|endoftext|>", "<|im_end|>", True),
    "mistral_v3": (MISTRAL_V03, "<s>", "</s>", False),  # v0.3 writes the system text in the last [INST] only
}


def _as_tunelab_writes_it(text: str, finished: bool = True) -> str:
    """tunelab's conventions (tests/test_templates.py): a finished dialogue ends at its last end-of-turn marker,
    and the space after '[/INST]' belongs to the answer."""
    return (text.removesuffix("\n") if finished else text).replace("[/INST] ", "[/INST]")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_new_family_template_renders_as_published(name):
    from tunelab.data.encode import PromptFormat
    from tunelab.data.formats import Turn

    published, bos, eos, keeps_system = FAMILIES[name]
    ours = template_to_jinja(TEMPLATES[name])
    system = SYSTEM if keeps_system else None
    # a finished two-turn dialogue (what training renders)
    expected = _as_tunelab_writes_it(_render(published, _messages(TWO_TURNS, system), bos, eos))
    assert _render(ours, _messages(TWO_TURNS, system), bos, eos) == expected
    # the generation prompt with a system text (Qwen3 in its non-thinking mode; Mistral v0.3 moves the system
    # text to the last [INST], tunelab keeps it in the first: they agree on a one-turn prompt)
    extra = {"enable_thinking": False} if name == "qwen3" else {}
    turns = TWO_TURNS if keeps_system else TWO_TURNS[:1]
    prompt = _render(published, _messages(turns, SYSTEM, open_last=True), bos, eos, True, **extra)
    assert _render(ours, _messages(turns, SYSTEM, open_last=True), bos, eos, True) == \
        _as_tunelab_writes_it(prompt, finished=False)
    # what training tokenises: the encoder's text, on a tokenizer with this model's bos and eos
    tok = _tokenizer(None, None)
    tok.add_special_tokens({"bos_token": bos or "<s>", "eos_token": eos})
    fmt = PromptFormat(tok, name, system=system or "")
    text = fmt.text([Turn(i, o) for i, o in TWO_TURNS])
    assert text == expected


# -- acceptance 4: the tutorial's InternLM config pointed at a ChatML model, through the real CLI ------

@pytest.fixture(scope="module")
def chatml_models(tmp_path_factory):
    """A tiny real Qwen2 with a ChatML-only vocabulary and Qwen3's chat_template, and the same model as a base
    model (no chat_template)."""
    from transformers import AutoTokenizer

    from tunelab.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("chatml")
    chat = build_tiny_model(root / "chat", "qwen2", markers=CHATML_MARKERS, chat_template=QWEN3)
    base = build_tiny_model(root / "base", "qwen2", markers=CHATML_MARKERS)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = None
    for stale in ("chat_template.jinja",):
        (base / stale).unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert not AutoTokenizer.from_pretrained(base).chat_template
    return {"chat": chat, "base": base}


def _copied_tutorial_config(folder, model, data_dir, **more):
    cp = run_cli("copy-cfg", "internlm_chat_7b_qlora_oasst1_e3", folder)
    assert cp.returncode == 0, cp.stderr
    cfg = folder / "internlm_chat_7b_qlora_oasst1_e3_copy.py"
    # the tutorial's two lines, plus what keeps a CPU run to one short step
    edit_config(cfg, pretrained_model_name_or_path=str(model),
                data_path=str(data_dir / "self_cognition" / "personal_assistant.json"),
                algorithm="lora", max_steps=1, max_length=128, evaluation_inputs=["hi"],
                evaluation_max_new_tokens=2, **more)
    return cfg


@pytest.mark.slow
def test_tutorial_internlm_config_on_a_chatml_model_stops_before_training(chatml_models, data_dir, tmp_path):
    cfg = _copied_tutorial_config(tmp_path, chatml_models["chat"], data_dir)
    cp = run_cli("train", cfg, cwd=tmp_path)
    assert cp.returncode == 2, cp.stdout[-2000:] + cp.stderr[-2000:]
    assert "Traceback" not in cp.stderr
    lines = [line for line in cp.stderr.splitlines() if "does not fit" in line]
    assert len(lines) == 1, cp.stderr
    assert "'internlm_chat'" in lines[0] and "<|im_start|>" in lines[0] and "prompt_template = 'auto'" in lines[0]
    assert not (tmp_path / "work_dirs").exists()  # nothing half-written


@pytest.mark.parametrize("template, said", [("auto", "prompt_template 'auto'"),
                                            ("qwen3", "lays turns out as the chat_template")])
@pytest.mark.slow
def test_matching_template_on_the_chatml_model_trains_without_complaint(chatml_models, data_dir, tmp_path,
                                                                          template, said):
    from transformers import AutoTokenizer

    cfg = _copied_tutorial_config(tmp_path, chatml_models["chat"], data_dir, prompt_template=template)
    cp = run_cli("train", cfg, cwd=tmp_path)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out[-3000:]
    assert said in out and "does not fit" not in out and "warning: prompt_template" not in out
    # the exported model carries the format it was trained in
    hf = tmp_path / "work_dirs" / "internlm_chat_7b_qlora_oasst1_e3_copy" / "hf"
    exported = AutoTokenizer.from_pretrained(hf).chat_template
    assert exported == (QWEN3 if template == "auto" else template_to_jinja(TEMPLATES["qwen3"]))


@pytest.mark.slow
def test_base_model_without_chat_template_trains_the_configured_template(chatml_models, data_dir, tmp_path):
    cfg = _copied_tutorial_config(tmp_path, chatml_models["base"], data_dir)
    cp = run_cli("train", cfg, cwd=tmp_path)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out[-3000:]
    assert "has no chat_template of its own" in out and "does not fit" not in out
