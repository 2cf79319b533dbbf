"""Acceptance 6: each kind of bad input gives one clear line on stderr and exit code 2, before any model loads."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli, write_config


def _one_error_line(cp) -> str:
    assert cp.returncode == 2, (cp.returncode, cp.stderr[-2000:])
    lines = [line for line in cp.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, cp.stderr
    assert "Traceback" not in cp.stderr
    return lines[0]


@pytest.fixture()
def good(tiny_llama, data_dir):
    return {"pretrained_model_name_or_path": str(tiny_llama),
            "data_path": str(data_dir / "self_cognition" / "personal_assistant.json"),
            "prompt_template": "internlm_chat", "max_length": 256}


def test_missing_model_folder(good, tmp_path):
    cfg = write_config(tmp_path / "c.py", **dict(good, pretrained_model_name_or_path="./internlm-chat-7b"))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert "pretrained_model_name_or_path './internlm-chat-7b'" in line and "not found" in line


def test_uncached_hub_model_offline(good, tmp_path):
    cfg = write_config(tmp_path / "c.py", **dict(good, pretrained_model_name_or_path="internlm/internlm-chat-7b"))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert "internlm/internlm-chat-7b" in line and "cache" in line


def test_missing_data_file(good, tmp_path):
    cfg = write_config(tmp_path / "c.py", **dict(good, data_path="./MedQA2019-structured-train.jsonl"))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert "./MedQA2019-structured-train.jsonl" in line and "not found" in line


def test_hub_dataset_offline(good, tmp_path):
    cfg = write_config(tmp_path / "c.py", **dict(good, data_path="timdettmers/openassistant-guanaco"))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert "timdettmers/openassistant-guanaco" in line and "download it" in line


def test_json_syntax_error_names_file_and_line(good, tmp_path):
    data = tmp_path / "broken.json"
    data.write_text('[\n  {"conversation": [{"input": "a", "output": "b"}]},\n'
                    '  {"conversation": [{"input": "c", "output": "d"}]\n]\n', encoding="utf-8")
    cfg = write_config(tmp_path / "c.py", **dict(good, data_path=str(data)))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert str(data) in line and "line 4" in line and "invalid JSON" in line


def test_json_lines_syntax_error_names_line(good, tmp_path):
    data = tmp_path / "broken.jsonl"
    rows = [json.dumps({"conversation": [{"input": "q", "output": "a"}]})] * 4
    rows[2] = rows[2][:-3]
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = write_config(tmp_path / "c.py", **dict(good, data_path=str(data)))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert f"{data}: line 3" in line


def test_unknown_config_key_suggests(good, tmp_path):
    cfg = write_config(tmp_path / "c.py", **dict(good, lora_rank=8))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert "unknown config key 'lora_rank'" in line and "did you mean 'lora_r'" in line


def test_unknown_config_key_in_cfg_options(good, tmp_path):
    cfg = write_config(tmp_path / "c.py", **good)
    line = _one_error_line(run_cli("train", cfg, "--cfg-options", "max_lenght=512", cwd=tmp_path))
    assert "'max_lenght'" in line and "did you mean 'max_length'" in line


def test_unknown_template_lists_valid_names(good, tmp_path):
    cfg = write_config(tmp_path / "c.py", **dict(good, prompt_template="internlm_caht"))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert "internlm_caht" in line
    for name in ("internlm_chat", "internlm2_chat", "llama2_chat", "qwen_chat", "default", "auto"):
        assert name in line


def test_record_without_trainable_output(good, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"conversation": [{"input": "q", "output": "a"}]}) + "\n"
                    + json.dumps({"conversation": [{"input": "q2", "output": ""}]}) + "\n", encoding="utf-8")
    cfg = write_config(tmp_path / "c.py", **dict(good, data_path=str(data)))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert f"{data}: line 2" in line and "no trainable output" in line and "skip_bad_records" in line
    assert not (tmp_path / "work_dirs").exists()  # nothing half-written


def test_wrong_type_and_bad_values(good, tmp_path):
    for key, value, expect in [("lr", "high", "'lr' must be a number"), ("lr", -1.0, "'lr' must be > 0"),
                               ("max_length", 0, "'max_length' must be >= 1"), ("lora_r", 0, "'lora_r' must be >= 1"),
                               ("algorithm", "qlora2", "'algorithm' must be one of")]:
        cfg = write_config(tmp_path / "c.py", **dict(good, **{key: value}))
        assert expect in _one_error_line(run_cli("train", cfg, cwd=tmp_path))


def test_config_syntax_error(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("lr = 1e-4\nmax_length = = 3\n", encoding="utf-8")
    line = _one_error_line(run_cli("train", cfg))
    assert f"{cfg}: line 2: syntax error" in line


def test_unknown_builtin_config_suggests():
    line = _one_error_line(run_cli("train", "internlm_chat_7b_qlora_oasst_e3"))
    assert "did you mean 'internlm_chat_7b_qlora_oasst1_e3'" in line


def test_chat_missing_adapter(tiny_llama, tmp_path):
    line = _one_error_line(run_cli("chat", tiny_llama, "--adapter", tmp_path / "nope", input=""))
    assert "--adapter" in line and "adapter_config.json" in line


def test_bad_shard_size(tiny_llama, tmp_path):
    line = _one_error_line(run_cli("convert", "split", tiny_llama, tmp_path / "o", "--max-shard-size", "big"))
    assert "--max-shard-size 'big'" in line
