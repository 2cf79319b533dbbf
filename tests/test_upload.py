"""Acceptance (issue 33, point 4): the model card says what the run was; offline or without a token, `tunelab
upload` ends with one line and exit code 2 before anything leaves the machine."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def trained_run(tiny_llama, tmp_path_factory):
    from tunelab.config.loader import load_config
    from tunelab.train.loop import train

    work = tmp_path_factory.mktemp("upload_run")
    values = dict(pretrained_model_name_or_path=str(tiny_llama), max_steps=3, log_interval=1, evaluation_inputs=[],
                  evaluation_data_path="builtin:self_cognition", evaluation_freq=3, SYSTEM="You are Tuney.",
                  report_to=[])
    cfg, name = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])
    return train(cfg, name, work_dir=str(work)).work_dir


@pytest.mark.slow
def test_model_card_describes_the_run(trained_run, tiny_llama):
    from tunelab.export.hub import model_card, run_summary

    hf = trained_run / "hf"
    summary = run_summary(hf)
    card = model_card("ada/tuney", summary)
    (run_dir,) = [p for p in trained_run.iterdir() if p.is_dir() and p.name[0].isdigit()]
    records = [json.loads(line) for line in (run_dir / "vis_data" / "scalars.json").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    val = [r for r in records if "val_loss" in r][-1]
    assert summary["plot"] == run_dir / "loss_curve.png"
    lines = card.splitlines()
    assert lines[:4] == ["---", "library_name: peft", "tags: [tunelab, lora]", "---"]  # a local base: no base_model
    assert f"A LoRA adapter fine-tuned from `{tiny_llama}` with tunelab (LoRA)." in lines
    for row in (f"| base model | `{tiny_llama}` |", "| algorithm | lora |", "| data | `builtin:self_cognition` |",
                "| prompt template | `internlm_chat` |", "| system text | You are Tuney. |", "| lr | `0.001` |",
                "| lora_r | `32` |", "| lora_alpha | `64` |", "| max_steps | `3` |",
                f"| final training loss | {last['loss']:.4f} (step 3) |",
                f"| final validation loss | {val['val_loss']:.4f} |",
                "![training loss and learning rate](loss_curve.png)",
                "hf download ada/tuney --local-dir model", f"tunelab chat {tiny_llama} --adapter model"):
        assert row in lines, row


@pytest.mark.slow
def test_model_card_names_a_hub_base(trained_run):
    """A base named by hub id goes into the card's front matter (the Hub links the two) and the chat line."""
    from tunelab.export.hub import model_card, run_summary

    summary = run_summary(trained_run / "hf")
    summary["config"].pretrained_model_name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
    card = model_card("ada/tuney", summary)
    assert card.splitlines()[1] == "base_model: Qwen/Qwen2.5-0.5B-Instruct"
    assert "tunelab chat Qwen/Qwen2.5-0.5B-Instruct --adapter model" in card.splitlines()


def test_upload_offline_or_without_token_is_one_line(tiny_llama, tmp_path, monkeypatch, capsys):
    from tunelab.cli import main

    assert main(["upload", str(tiny_llama), "ada/tuney"]) == 2  # the tests run with HF_HUB_OFFLINE=1
    assert capsys.readouterr().err.splitlines() == [
        "tunelab: error: upload: HF_HUB_OFFLINE is set, and uploading needs the network; unset it and retry"]
    assert main(["upload", str(tmp_path), "ada/tuney"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tunelab: error: upload: '{tmp_path}' holds no adapter_config.json or config.json; give an adapter or "
        f"model folder (work_dirs/<config>/hf, or the output of `tunelab convert merge`)"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login (a fresh process reads it)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    cp = run_cli("upload", tiny_llama, "ada/tuney", "--private")
    assert cp.returncode == 2 and cp.stderr.splitlines() == [
        "tunelab: error: upload: no Hugging Face token; pass --token, set HF_TOKEN, or run `hf auth login`"]
