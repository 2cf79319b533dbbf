"""The tutorial's story through the real CLI, as subprocesses: copy-cfg, edit, train, convert, merge, chat."""
from __future__ import annotations

import json

import pytest

from conftest import edit_config, run_cli

ANSWER = "我是不要葱姜蒜大佬的小助手，内在是上海AI实验室书生·浦语的7B大模型哦"


@pytest.mark.parametrize("variant,arch", [("demo", "internlm"), ("demo_qlora", "llama"), ("demo_full", "qwen2")])
@pytest.mark.slow
def test_tutorial_story(variant, arch, tiny_models, data_dir, tmp_path):
    cp = run_cli("copy-cfg", variant, tmp_path)
    assert cp.returncode == 0, cp.stderr
    cfg = tmp_path / f"{variant}_copy.py"
    edit_config(cfg, pretrained_model_name_or_path=str(tiny_models[arch]),
                data_path=str(data_dir / "self_cognition" / "personal_assistant.json"))

    cp = run_cli("train", cfg, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-3000:]
    work = tmp_path / "work_dirs" / f"{variant}_copy"
    last = (work / "last_checkpoint").read_text().strip()
    assert last.endswith(".pth")
    assert (work / f"{variant}_copy.py").is_file()
    scalars = next(work.glob("*/vis_data/scalars.json")).read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in scalars]
    assert losses[-1] < 0.2 * losses[0], losses
    log_text = next(work.glob("*/*.log")).read_text(encoding="utf-8")
    final_step = json.loads(scalars[-1])["step"]
    assert "eval step 0 |" in log_text and f"eval step {final_step} |" in log_text
    assert f"你是谁 -> {ANSWER}" in log_text  # the final evaluation answer, written to the log

    cp = run_cli("convert", "pth_to_hf", cfg, last, tmp_path / "hf", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-3000:]
    if variant == "demo_full":
        assert (tmp_path / "hf" / "config.json").is_file()
        model_dir = tmp_path / "hf"
    else:
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {
            p.name for p in (tmp_path / "hf").iterdir()}
        cp = run_cli("convert", "merge", tiny_models[arch], tmp_path / "hf", tmp_path / "merged",
                     "--max-shard-size", "200KB", cwd=tmp_path)
        assert cp.returncode == 0, cp.stderr[-3000:]
        assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 1  # honours --max-shard-size
        model_dir = tmp_path / "merged"

    # The chat template travels with the model, so no --prompt-template is needed.
    cp = run_cli("chat", model_dir, "--temperature", "0", "--max-new-tokens", "80", cwd=tmp_path,
                 input="你是谁\nEXIT\n")
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert cp.stdout.splitlines()[0] == ANSWER
    if variant == "demo":  # base + --adapter as in the tutorial, multi-turn RESET, 8-bit loading
        cp = run_cli("chat", tiny_models[arch], "--adapter", tmp_path / "hf", "--prompt-template",
                     "internlm_chat", "--temperature", "0", "--max-new-tokens", "80", input="请介绍一下你自己\n")
        assert cp.returncode == 0, cp.stderr[-3000:]
        assert cp.stdout.splitlines()[0] == ANSWER
        cp = run_cli("chat", model_dir, "--temperature", "0", "--max-new-tokens", "80", "--bits", "8",
                     "--no-streamer", input="你是谁\nRESET\n你是哪位\n")
        assert cp.returncode == 0, cp.stderr[-3000:]
        assert cp.stdout.splitlines() == [ANSWER, "(history cleared)", ANSWER]
    if variant == "demo_qlora":  # the tutorial's `chat ./merged --bits 4`
        cp = run_cli("chat", model_dir, "--temperature", "0", "--max-new-tokens", "80", "--bits", "4",
                     input="你是谁\n")
        assert cp.returncode == 0, cp.stderr[-3000:]
        assert cp.stdout.splitlines()[0] == ANSWER
