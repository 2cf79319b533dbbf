"""Training numerics: packed loss equals per-sample loss, adapters round-trip through PEFT, merging is exact."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_packed_equals_alone, edit_config, run_cli
from tunelab.config.loader import load_config
from tunelab.data.dataset import build_sequences, collate, encode_sample
from tunelab.data.encode import PromptFormat
from tunelab.data.formats import Turn
from tunelab.model.load import load_model, load_tokenizer
from tunelab.train.loop import train
from tunelab.train.setup import lr_lambda
from tunelab.model.losses import token_losses


def _cfg(model_dir, data, **over):
    values = {"pretrained_model_name_or_path": str(model_dir), "data_path": str(data)}
    values.update(over)
    cfg, _ = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])
    return cfg


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "internlm"])
def test_packed_loss_equals_loss_alone(arch, tiny_models, data_dir):
    """Acceptance 5: each packed sample's per-token loss equals its loss computed alone (fp32, 1e-5)."""
    cfg = _cfg(tiny_models[arch], data_dir / "xtuner_toy", max_length=512, pack_to_max_length=True)
    tokenizer = load_tokenizer(str(tiny_models[arch]))
    model = load_model(str(tiny_models[arch]), dtype=torch.float32).eval()
    fmt = PromptFormat(tokenizer, cfg.prompt_template)
    dialogues = [[Turn("Hello?", "Hello! How can I help you?")],
                 [Turn("What's 2+2?", "4"), Turn("And 3+3?", "6, of course.")],
                 [Turn("", "Plain text for continued pre-training.")]]
    alone = [encode_sample(fmt, d, 512)[0] for d in dialogues]
    from tunelab.data.dataset import pack

    packed = pack(alone, 512)
    assert len(packed) == 1 and packed[0].position_ids.count(0) == 3
    assert_packed_equals_alone(model, packed, alone, tokenizer.pad_token_id)
    with torch.no_grad():
        # a padded batch of the same samples gives the same per-token losses too
        padded = token_losses(model, collate(alone, tokenizer.pad_token_id), torch.float32)
        for row, seq in enumerate(alone):
            own = token_losses(model, collate([seq], tokenizer.pad_token_id), torch.float32)[0]
            torch.testing.assert_close(padded[row, :len(seq)], own, atol=1e-5, rtol=0)


def test_build_sequences_packs_the_real_data(tiny_llama, data_dir):
    cfg = _cfg(tiny_llama, data_dir / "medqa2019" / "MedQA2019-structured-train.jsonl", max_length=2048)
    tokenizer = load_tokenizer(str(tiny_llama))
    seqs, stats = build_sequences(cfg, tokenizer)
    assert stats.records == 482 and stats.samples == 482 and stats.truncated > 0
    assert all(len(s) <= 2048 for s in seqs) and stats.sequences == len(seqs) < 482
    assert sum(s.position_ids.count(0) for s in seqs) == 482  # every sample kept whole, once


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(100, 0.1)
    values = [f(s) for s in range(100)]
    assert values[0] < values[5] < values[9] <= 1.0
    assert max(values) == pytest.approx(1.0, abs=0.1) and values[-1] < 0.01
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


@pytest.mark.slow
def test_adapter_and_merge_interop(tiny_models, data_dir, tmp_path, monkeypatch):
    """Acceptance 3: pth_to_hf output loads with PEFT and matches the trained model (1e-4); the merged model
    matches base + adapter (1e-3)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    base = tiny_models["mistral"]
    cfg = _cfg(base, data_dir / "self_cognition" / "personal_assistant.json", max_steps=20, lora_dropout=0.1)
    result = train(cfg, "interop")
    trained = result.model.eval()
    ids = torch.tensor([result.tokenizer.encode("你是谁? who are you", add_special_tokens=False)])
    with torch.no_grad():
        reference = trained(ids).logits

    cfg_file = result.work_dir / "interop.py"
    pth = (result.work_dir / "last_checkpoint").read_text().strip()
    cp = run_cli("convert", "pth_to_hf", cfg_file, pth, tmp_path / "adapter")
    assert cp.returncode == 0, cp.stderr
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        via_peft = peft_model(ids).logits
    torch.testing.assert_close(via_peft, reference, atol=1e-4, rtol=0)
    # the adapter must actually change the model, or the comparison above proves nothing
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert (plain - reference).abs().max() > 1e-2

    cp = run_cli("convert", "merge", base, tmp_path / "adapter", tmp_path / "merged")
    assert cp.returncode == 0, cp.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, via_peft, atol=1e-3, rtol=0)
    # the merged folder carries the training chat template for other tools
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|User|>:hi<eoh>\n<|Bot|>:"
    assert json.loads((tmp_path / "merged" / "tunelab.json").read_text())["prompt_template"] == "internlm_chat"


@pytest.mark.slow
def test_medqa_trains_with_only_data_path_changed(data_dir, tmp_path):
    """Acceptance 4: the tutorial's pretty-printed JSON array named .jsonl trains; the loss falls in 30 steps."""
    cp = run_cli("copy-cfg", "demo", tmp_path)
    assert cp.returncode == 0, cp.stderr
    cfg = tmp_path / "demo_copy.py"
    edit_config(cfg, data_path=str(data_dir / "medqa2019" / "MedQA2019-structured-train.jsonl"))
    cp = run_cli("train", cfg, "--cfg-options", "max_steps=30", "log_interval=1", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-3000:]
    scalars = next((tmp_path / "work_dirs" / "demo_copy").glob("*/vis_data/scalars.json"))
    losses = [json.loads(line)["loss"] for line in scalars.read_text().splitlines()]
    assert len(losses) == 30
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses
    assert "482 records -> 482 samples" in cp.stderr


def test_bf16_config_trains_on_cpu(tiny_llama, tmp_path):
    """torch_dtype='bf16' on a CPU (weights stay fp32 there, no autocast): the attention mask follows the
    weights, the run finishes and logs finite losses."""
    from conftest import run_losses

    values = dict(pretrained_model_name_or_path=str(tiny_llama), torch_dtype="bf16", max_steps=3,
                  save_steps=1000, log_interval=1, evaluation_inputs=["who are you"], evaluation_freq=1000)
    cfg, name = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])
    train(cfg, name, work_dir=str(tmp_path))
    losses = run_losses(tmp_path)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses


@pytest.mark.parametrize("fast_path", ["off", "on"])
@pytest.mark.slow
def test_qlora_losses_do_not_change_with_evaluations_between_steps(tiny_llama, tmp_path, fast_path):
    """`tunelab train demo_qlora` on the CPU, plain and fast path, LoRA dropout 0.1: evaluating (generating)
    before training and every second step leaves the training losses exactly as without evaluations: the
    generation draws nothing from the training's random stream and leaves the 4-bit weights as they were
    (see test_model.test_qlora_training_is_unchanged_by_an_evaluation_forward)."""
    from conftest import run_losses

    runs = {}
    for every in (2, None):  # before training, at steps 2 and 4, at the end; or never (the default frequency)
        values = dict(pretrained_model_name_or_path=str(tiny_llama), max_steps=6, save_steps=1000, log_interval=1,
                      evaluation_inputs=["who are you"] if every else [], evaluation_freq=every or 500,
                      fast_path=fast_path, lora_dropout=0.1)
        cfg, name = load_config("demo_qlora", [f"{k}={v!r}" for k, v in values.items()])
        assert cfg.algorithm == "qlora"
        train(cfg, name, work_dir=str(tmp_path / str(every)))
        runs[every] = run_losses(tmp_path / str(every))
    assert sorted(runs[None]) == list(range(1, 7)) and runs[2] == runs[None], runs
    answers = next((tmp_path / "2").glob("*/eval_answers.jsonl")).read_text().splitlines()
    assert len(answers) == 4, answers


def test_optimizer_step_skips_a_bad_step_on_the_device_as_on_the_host(tiny_llama, data_dir, monkeypatch):
    """`optimizer_step` with a fused AdamW (the skip decided on the device, one wait for the GPU) takes the
    same steps as with a plain AdamW (the skip decided on the host); a step whose loss is not finite returns
    None and leaves the weights, the moments and the step count as they were."""
    from tunelab.train import step as step_module
    from tunelab.train.step import optimizer_step, skips_on_device
    from tunelab.train.setup import build_model

    cfg = _cfg(tiny_llama, data_dir / "xtuner_toy", max_length=256, accumulative_counts=2, max_norm=1.0)
    tokenizer = load_tokenizer(str(tiny_llama))
    seqs, _ = build_sequences(cfg, tokenizer)
    window = [seqs[:2], seqs[2:4]]
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg, str(tiny_llama), "cpu", torch.float32).train()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # LoRA B starts at zero; give every parameter a gradient from the first step
            p.data.normal_(0, 0.02)
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=fused)
        assert skips_on_device(optimizer) == fused
        losses = [optimizer_step(model, window, optimizer, params, cfg, tokenizer, torch.float32, 1)[0]]
        before = [p.detach().clone() for p in params]
        moments = [optimizer.state[p]["exp_avg"].clone() for p in params]
        with monkeypatch.context() as m:  # a non-finite loss in this step (tests/fault_injection.py does it so)
            m.setattr(step_module, "forward_backward", lambda *a, f=step_module.forward_backward: f(*a) * float("inf"))
            assert optimizer_step(model, window, optimizer, params, cfg, tokenizer, torch.float32, 2)[0] is None
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert all(torch.equal(optimizer.state[p]["exp_avg"], m) for p, m in zip(params, moments))
        assert all(float(optimizer.state[p]["step"]) == 1 for p in params)
        assert p.grad is None
        losses.append(optimizer_step(model, window, optimizer, params, cfg, tokenizer, torch.float32, 3)[0])
        assert not any(torch.equal(p, b) for p, b in zip(params, before)), "the good step after it did not update"
        runs[fused] = losses, [p.detach().clone() for p in params]
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
