"""Acceptance 6: each kind of bad input gives one clear line on stderr and exit code 2, before any model loads
where the input can be judged without the model."""
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


@pytest.mark.slow
def test_missing_data_file(good, tmp_path):
    cfg = write_config(tmp_path / "c.py", **dict(good, data_path="./MedQA2019-structured-train.jsonl"))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert "./MedQA2019-structured-train.jsonl" in line and "not found" in line


@pytest.mark.slow
def test_hub_dataset_offline(good, tmp_path):
    cfg = write_config(tmp_path / "c.py", **dict(good, data_path="timdettmers/openassistant-guanaco"))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert "timdettmers/openassistant-guanaco" in line and "download it" in line


@pytest.mark.slow
def test_json_syntax_error_names_file_and_line(good, tmp_path):
    data = tmp_path / "broken.json"
    data.write_text('[\n  {"conversation": [{"input": "a", "output": "b"}]},\n'
                    '  {"conversation": [{"input": "c", "output": "d"}]\n]\n', encoding="utf-8")
    cfg = write_config(tmp_path / "c.py", **dict(good, data_path=str(data)))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert str(data) in line and "line 4" in line and "invalid JSON" in line


@pytest.mark.slow
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


@pytest.mark.slow
def test_unknown_template_lists_valid_names(good, tmp_path):
    cfg = write_config(tmp_path / "c.py", **dict(good, prompt_template="internlm_caht"))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert "internlm_caht" in line
    for name in ("internlm_chat", "internlm2_chat", "llama2_chat", "qwen_chat", "default", "auto"):
        assert name in line


@pytest.mark.slow
def test_record_without_trainable_output(good, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"conversation": [{"input": "q", "output": "a"}]}) + "\n"
                    + json.dumps({"conversation": [{"input": "q2", "output": ""}]}) + "\n", encoding="utf-8")
    cfg = write_config(tmp_path / "c.py", **dict(good, data_path=str(data)))
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert f"{data}: line 2" in line and "no trainable output" in line and "skip_bad_records" in line
    assert not (tmp_path / "work_dirs").exists()  # nothing half-written


@pytest.mark.slow
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


# Issue 4, acceptance 6: config mistakes, each one line and exit 2, found before any model is loaded.
BAD_CONFIGS = [
    ("lr", "1e-4", "'lr' must be a number"),
    ("lr", -1e-4, "'lr' must be > 0"),
    ("max_length", 0, "'max_length' must be >= 1"),
    ("lora_r", 0, "'lora_r' must be >= 1"),
    ("lora_alpha", 0, "'lora_alpha' must be > 0"),
    ("lora_dropout", 1.5, "'lora_dropout' must be < 1"),
    ("optim_type", "SGDW", "'optim_type' must be one of 'AdamW'"),
    ("algorithm", "qlora2", "'algorithm' must be one of 'full', 'lora', 'qlora'"),
    ("max_epochs", 0, "'max_epochs' must be >= 1"),
    ("accumulative_counts", 0, "'accumulative_counts' must be >= 1"),
    ("batch_size", 2.5, "'batch_size' must be an integer"),
    ("warmup_ratio", 1.5, "'warmup_ratio' must be < 1"),
    ("betas", [0.9], "'betas' must be two numbers"),
    ("evaluation_freq", 10, "'evaluation_freq' is set but there is nothing to evaluate"),
    ("evaluation_inputs", "who are you", "'evaluation_inputs' must be a list"),
    ("evaluation_inputs", ["ok", 3], "'evaluation_inputs' must hold non-empty strings"),
    ("data_path", [], "'data_path' is an empty list"),
    ("torch_dtype", "float8", "'torch_dtype' must be one of"),
    ("save_total_limit", -2, "'save_total_limit' must be >= -1"),
    ("pack_to_max_length", "yes", "'pack_to_max_length' must be True or False"),
    ("validation_split", 1.0, "'validation_split' must be < 1"),
    ("dataset_format", "csvv", "unknown format 'csvv'"),
    ("batch_size", 50, "'batch_size' 50 is larger than the dataset"),
]


@pytest.mark.parametrize("key,value,expect", BAD_CONFIGS, ids=[f"{k}={v!r}" for k, v, _ in BAD_CONFIGS])
def test_bad_config_values(good, tmp_path, monkeypatch, capsys, key, value, expect):
    import tunelab.model.load
    from tunelab.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was reported")

    monkeypatch.setattr(tunelab.model.load, "load_model", no_model)
    monkeypatch.setattr("tunelab.train.setup.load_model", no_model)
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.py", **dict(good, **{key: value}))
    assert main(["train", str(cfg)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("tunelab: error: ") and expect in err[0], err
    assert not (tmp_path / "work_dirs").exists()


def test_lora_targets_that_name_no_module_of_the_model(good, tiny_models, tmp_path):
    """Llama's projection names on a Phi-3 model (fused qkv_proj and gate_up_proj): PEFT would put adapters on
    o_proj and down_proj alone and train on, so the names that match nothing stop the run once the model has
    loaded (after the run's first log lines), the model's own names given; no step is logged."""
    cfg = write_config(tmp_path / "c.py", **dict(good, pretrained_model_name_or_path=str(tiny_models["phi3"]),
                                                 prompt_template="phi3_chat", max_steps=2,
                                                 lora_target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    cp = run_cli("train", cfg, "--work-dir", tmp_path / "work", cwd=tmp_path)
    assert cp.returncode == 2 and "Traceback" not in cp.stderr, cp.stderr[-2000:]
    assert cp.stderr.strip().splitlines()[-1] == (
        "tunelab: error: lora_target_modules: 'q_proj', 'v_proj' name no module of this Phi3ForCausalLM; its "
        "linear layers are down_proj, gate_up_proj, o_proj, qkv_proj (or use 'all-linear')"), cp.stderr[-2000:]
    assert not list((tmp_path / "work").glob("*/vis_data/scalars.json"))
