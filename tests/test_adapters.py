"""Issue 28, point 4: the adapter variants PEFT users reach for (use_rslora, use_dora, lora_init pissa/olora/loftq).

Adapters trained by `tunelab train` load in plain PEFT on the original base and give there the logits of the model
that trained (PiSSA/OLoRA train on a base with part of each weight moved into the adapter); the fast path runs
rsLoRA, PiSSA and OLoRA with the plain path's losses and gradients, and leaves DoRA to the plain path, saying why;
bad values are one line and exit 2."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import run_cli, write_config
from test_fast import _batch, _losses_and_grads, _wake_lora_b
from tunelab.config.loader import load_config
from tunelab.train.setup import build_model
from tunelab.model.state import load_trainable_state
from tunelab.model.losses import token_losses


def _config(model: Path, data: Path | str, **over) -> dict:
    return {**dict(pretrained_model_name_or_path=str(model), data_path=str(data), prompt_template="internlm_chat",
                   max_length=128, algorithm="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, torch_dtype="fp32",
                   max_steps=3, accumulative_counts=1, lr=1e-2, warmup_ratio=0.0, log_interval=1), **over}


def _cfg(**values):
    return load_config("demo", [f"{k}={v!r}" for k, v in values.items()])[0]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def _last_checkpoint(work: Path) -> Path:
    return Path((work / "last_checkpoint").read_text().strip())


def _trained_model(cfg, model_path: Path, checkpoint: Path):
    """The model as it trained: the config's LoRA set-up (PiSSA/OLoRA's residual base), the checkpoint's weights."""
    model = build_model(cfg, str(model_path), "cpu", torch.float32)
    load_trainable_state(model, cfg.algorithm, torch.load(checkpoint, weights_only=False)["model"])
    return model


VARIANTS = {"rslora": dict(use_rslora=True), "dora": dict(use_dora=True),
            "pissa": dict(lora_init="pissa", use_rslora=True), "olora": dict(lora_init="olora")}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_trained_variant_loads_in_plain_peft_with_the_trained_logits(variant, tiny_llama, data_dir, tmp_path):
    """Acceptance 5: `tunelab train` with rsLoRA, DoRA, PiSSA (and OLoRA), then hf/ on the original base in plain
    PEFT, through tunelab's chat loading, and the model as it trained (residual base and all) give the same
    logits (fp32, 1e-4); `convert pth_to_hf` writes the same adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.chat.session import ChatOptions, load_chat_model

    values = _config(tiny_llama, data_dir / "self_cognition" / "personal_assistant.json", **VARIANTS[variant])
    cp = run_cli("train", write_config(tmp_path / "v.py", **values), cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-3000:]
    work = tmp_path / "work_dirs" / "v"
    hf = work / "hf"
    adapter_config = json.loads((hf / "adapter_config.json").read_text())
    moved = variant in ("pissa", "olora")
    assert adapter_config["use_rslora"] == VARIANTS[variant].get("use_rslora", False)
    assert adapter_config["use_dora"] == (variant == "dora")
    assert adapter_config["init_lora_weights"] is True  # nothing to redo at load: the base is the original
    assert adapter_config["r"] == (16 if moved else 8)  # PiSSA/OLoRA: [B | -B0] [A ; A0]

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    before = _logits(base, ids)
    via_peft = _logits(PeftModel.from_pretrained(base, str(hf)), ids)
    chat_model, _, _ = load_chat_model(ChatOptions(model=str(hf), torch_dtype="fp32"))
    via_chat = _logits(chat_model, ids)
    trained = _logits(_trained_model(_cfg(**values), tiny_llama, _last_checkpoint(work)), ids)
    assert (trained - before).abs().max() > 1e-2  # the adapter learned something the checks can see
    torch.testing.assert_close(via_peft, trained, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(via_chat, trained, rtol=1e-4, atol=1e-4)

    if moved:  # the checkpoint carries the adapter's start that the export subtracts
        cp = run_cli("convert", "pth_to_hf", tmp_path / "v.py", _last_checkpoint(work), tmp_path / "out", cwd=tmp_path)
        assert cp.returncode == 0, cp.stderr[-3000:]
        from safetensors.torch import load_file

        want, got = (load_file(d / "adapter_model.safetensors") for d in (hf, tmp_path / "out"))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 16


def test_resume_trains_on_the_residual_base_the_checkpoint_started_from(tiny_llama):
    """PiSSA/OLoRA resume: a run whose own start differs from the checkpoint's (here a fast SVD against a full
    one) puts its base back to the residual the checkpoint trained on: the same logits as the saved run."""
    from peft import get_peft_model_state_dict

    from tunelab.train.setup import load_weights

    saved = build_model(_cfg(**_config(tiny_llama, "unused", lora_init="pissa")), str(tiny_llama), "cpu",
                        torch.float32)
    with torch.no_grad():
        for name, p in saved.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn_like(p))  # trained a little
    state = {"meta": {"algorithm": "lora"}, "initial_adapter": saved.tunelab_initial_adapter,
             "model": {k: v.clone() for k, v in get_peft_model_state_dict(saved).items()}}
    resumed = build_model(_cfg(**_config(tiny_llama, "unused", lora_init="pissa_niter_1")), str(tiny_llama), "cpu",
                          torch.float32)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    load_trainable_state(resumed, "lora", state["model"])
    assert (_logits(resumed, ids) - _logits(saved, ids)).abs().max() > 1e-3  # the starts do differ
    load_weights(state, resumed, _cfg(**_config(tiny_llama, "unused", lora_init="pissa_niter_1")), fingerprint="")
    torch.testing.assert_close(_logits(resumed, ids), _logits(saved, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["rslora", "pissa", "olora"])
def test_fast_path_runs_the_variants_with_the_plain_paths_losses_and_grads(variant, tiny_llama):
    """fast_path 'on' (CPU) with the config's rsLoRA, PiSSA or OLoRA: the fast path reads PEFT's scale and the
    initialised weights, so per-token losses (1e-5) and LoRA gradients (1e-4) equal the plain path's."""
    over = dict(use_rslora=True) if variant == "rslora" else dict(lora_init=variant)
    cfg = _cfg(**_config(tiny_llama, "unused", fast_path="on", **over))
    model = build_model(cfg, str(tiny_llama), "cpu", torch.float32)
    fast = model.tunelab_fast
    assert fast.layers[0].q.scale == pytest.approx(16 / 8 ** 0.5 if variant == "rslora" else 2.0)
    if variant == "rslora":
        _wake_lora_b(model)  # PiSSA/OLoRA start with B != 0 already
    model.train()
    batch = _batch(model.config.vocab_size, [[40, 25], [50]])
    quick, quick_grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.float32), batch)
    del model.tunelab_fast  # token_losses: the model's own forward
    plain, plain_grads = _losses_and_grads(model, lambda b: token_losses(model, b, torch.float32), batch)
    torch.testing.assert_close(quick, plain, rtol=1e-5, atol=1e-7)
    lora = [n for n in plain_grads if "lora_A" in n or "lora_B" in n]
    assert lora and plain_grads.keys() == quick_grads.keys()
    for name in lora:
        want = plain_grads[name]
        assert want.norm() > 0, name
        assert (quick_grads[name] - want).norm() / want.norm() < 1e-4, name


def test_dora_with_fast_path_on_runs_the_plain_path_and_says_why(tiny_llama, caplog):
    """use_dora with fast_path 'on': decided from the config before PEFT adds DoRA, one log line says why, and
    the model has PEFT's DoRA magnitudes."""
    cfg = _cfg(**_config(tiny_llama, "unused", fast_path="on", use_dora=True))
    with caplog.at_level(logging.INFO, logger="tunelab"):
        model = build_model(cfg, str(tiny_llama), "cpu", torch.float32)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fast path")]
    assert lines == ["fast path off: use_dora: DoRA adapters (the fast path computes plain LoRA; the plain path "
                     "runs DoRA)"]
    assert not hasattr(model, "tunelab_fast")
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_loftq_starts_qlora_adapters_at_the_4bit_rounding_error(tiny_llama, data_dir, tmp_path):
    """lora_init 'loftq' (QLoRA, bitsandbytes 4-bit on the CPU): base + adapter is closer to the full-precision
    weights than the 4-bit base alone, in every module and in the logits; the base stays as loaded, so the
    adapter a run exports gives, on the original base loaded in 4 bits in plain PEFT, the trained logits."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tunelab.model.load import _keep_4bit_layout, load_model

    values = _config(tiny_llama, data_dir / "self_cognition" / "personal_assistant.json", algorithm="qlora",
                     lora_init="loftq", max_steps=2, gradient_checkpointing=False)
    cfg = _cfg(**values)
    model = build_model(cfg, str(tiny_llama), "cpu", torch.float32)
    full = load_file(str(tiny_llama / "model.safetensors"))
    seen = 0
    for name, module in model.base_model.model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        w = module.base_layer.weight
        rounded = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        lora = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
        error = full[f"{name}.weight"].float() - rounded
        left = error - lora.detach()
        assert left.norm() < 0.95 * error.norm(), name
        seen += 1
    assert seen == 14
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    exact = _logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), ids)
    four_bit = load_model(str(tiny_llama), dtype=torch.float32, bits=4, device="cpu")
    # as in training: bitsandbytes would otherwise repack the weights for its CPU inference kernel, whose
    # logits differ from its training kernel's by ~0.1 here, with or without an adapter
    _keep_4bit_layout(four_bit)
    assert (_logits(model, ids) - exact).norm() < (_logits(four_bit, ids) - exact).norm()

    cp = run_cli("train", write_config(tmp_path / "q.py", **values), cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-3000:]
    work = tmp_path / "work_dirs" / "q"
    trained = _logits(_trained_model(cfg, tiny_llama, _last_checkpoint(work)), ids)
    via_peft = _logits(PeftModel.from_pretrained(four_bit, str(work / "hf")), ids)
    torch.testing.assert_close(via_peft, trained, rtol=1e-4, atol=1e-4)


BAD = [
    (dict(lora_init="pisa"), "'lora_init' must be one of default, gaussian, pissa, pissa_niter_<N>, olora, loftq, "
                             "got 'pisa' (did you mean 'pissa'?)"),
    (dict(lora_init="pissa_niter_0"), "'lora_init' must be one of"),
    (dict(use_dora="yes"), "'use_dora' must be True or False, got 'yes'"),
    (dict(algorithm="qlora", lora_init="pissa"), "'lora_init' 'pissa' moves part of each weight out of the base"),
    (dict(algorithm="qlora", lora_init="olora"), "use algorithm 'lora', or lora_init 'loftq' for QLoRA"),
    (dict(lora_init="loftq"), "'lora_init' 'loftq' starts the adapter at a 4-bit base's rounding error; it needs "
                              "algorithm 'qlora', got 'lora'"),
    (dict(algorithm="qlora", lora_init="loftq", use_dora=True), "'use_dora' with lora_init 'loftq' is not supported"),
    (dict(algorithm="full", use_rslora=True), "'use_rslora = True' sets up LoRA adapters, which algorithm 'full'"),
]


@pytest.mark.parametrize("values,expect", BAD, ids=[",".join(f"{k}={v}" for k, v in b.items()) for b, _ in BAD])
def test_bad_variant_settings_are_one_line_and_exit_2(values, expect, tiny_llama, data_dir, tmp_path, monkeypatch,
                                                      capsys):
    """Each bad value or combination: exit 2 and one line naming the key, before any model loads."""
    from tunelab.cli import main

    monkeypatch.setattr("tunelab.train.setup.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.chdir(tmp_path)
    data = data_dir / "self_cognition" / "personal_assistant.json"
    cfg = write_config(tmp_path / "bad.py", **_config(tiny_llama, data, **values))
    assert main(["train", str(cfg)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tunelab: error: ") and expect in lines[0], lines
    assert not (tmp_path / "work_dirs").exists()


def test_bad_variant_from_the_command_line(tiny_llama, data_dir, tmp_path):
    """The same through the CLI process and --cfg-options: one line on stderr, exit code 2."""
    data = data_dir / "self_cognition" / "personal_assistant.json"
    cfg = write_config(tmp_path / "c.py", **_config(tiny_llama, data))
    cp = run_cli("train", cfg, "--cfg-options", "lora_init='svd'", cwd=tmp_path)
    lines = [line for line in cp.stderr.splitlines() if line.strip()]
    assert cp.returncode == 2 and len(lines) == 1 and "'lora_init' must be one of" in lines[0], cp.stderr[-2000:]
