"""Config files: one schema, did-you-mean, overrides, the built-in catalogue and copy-cfg."""
from __future__ import annotations

import pytest

from conftest import run_cli, write_config
from tunelab.config.catalogue import BUILTIN
from tunelab.config.loader import load_config, parse_overrides, read_config_file
from tunelab.config.schema import FIELDS
from tunelab.errors import ConfigError


def test_tutorial_configs_exist():
    assert "internlm_chat_7b_qlora_oasst1_e3" in BUILTIN and "demo" in BUILTIN
    cfg, name = load_config("internlm_chat_7b_qlora_oasst1_e3")
    assert name == "internlm_chat_7b_qlora_oasst1_e3"
    assert (cfg.algorithm, cfg.prompt_template, cfg.max_epochs) == ("qlora", "internlm_chat", 3)
    assert cfg.trust_remote_code is True


@pytest.mark.slow
def test_list_cfg_and_pattern():
    cp = run_cli("list-cfg")
    assert cp.returncode == 0
    names = cp.stdout.split()
    assert names == sorted(BUILTIN) and "internlm_chat_7b_qlora_oasst1_e3" in names
    cp = run_cli("list-cfg", "-p", "INTERNLM_CHAT")
    assert cp.stdout.split() and all("internlm_chat" in n for n in cp.stdout.split())


def test_copy_cfg_writes_complete_commented_file(tmp_path):
    cp = run_cli("copy-cfg", "internlm_chat_7b_qlora_oasst1_e3", tmp_path)
    assert cp.returncode == 0, cp.stderr
    path = tmp_path / "internlm_chat_7b_qlora_oasst1_e3_copy.py"
    text = path.read_text()
    for key, f in FIELDS.items():  # every key, with its schema help as a comment
        assert f"\n{key} = " in text
        assert f.metadata["help"].split()[0] in text
    values = read_config_file(path)
    assert values == {k: v for k, v in values.items() if k in FIELDS}
    builtin = BUILTIN["internlm_chat_7b_qlora_oasst1_e3"]
    for key, value in builtin.items():
        assert values[key] == value, key


def test_overrides_parse_literals_and_strings():
    assert parse_overrides(["lr=1e-4", "data_path=./x.json", "evaluation_inputs=['a', 'b']", "shuffle=False"]) == {
        "lr": 1e-4, "data_path": "./x.json", "evaluation_inputs": ["a", "b"], "shuffle": False}
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["lr"])


def test_override_applies_and_is_validated(tmp_path):
    cfg_file = write_config(tmp_path / "c.py", pretrained_model_name_or_path="m", data_path="d.json")
    cfg, name = load_config(str(cfg_file), ["lr=3e-4", "lora_target_modules=['q_proj']"])
    assert name == "c" and cfg.lr == 3e-4 and cfg.lora_target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match="'batch_size' must be an integer"):
        load_config(str(cfg_file), ["batch_size=1.5"])
    # a key that takes a bool or 'auto' (the default) names both in its error
    assert load_config(str(cfg_file))[0].offload_checkpoints == "auto"
    assert load_config(str(cfg_file), ["offload_checkpoints=False"])[0].offload_checkpoints is False
    with pytest.raises(ConfigError, match="'offload_checkpoints' must be True or False or one of 'auto', got 'yes'"):
        load_config(str(cfg_file), ["offload_checkpoints='yes'"])


def test_required_keys_and_case_insensitive_suggestion(tmp_path):
    cfg_file = write_config(tmp_path / "c.py", data_path="d.json")
    with pytest.raises(ConfigError, match="'pretrained_model_name_or_path' is required"):
        load_config(str(cfg_file))
    cfg_file = write_config(tmp_path / "c.py", pretrained_model_name_or_path="m", data_path="d", system="x")
    with pytest.raises(ConfigError, match="did you mean 'SYSTEM'"):
        load_config(str(cfg_file))


def test_config_file_may_use_python_and_private_names(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("import os\n_base = 'm'\npretrained_model_name_or_path = os.path.join(_base, 'x')\n"
                    "data_path = ['a.json', 'b.json']\nlr = 2 * 1e-4\n", encoding="utf-8")
    cfg, _ = load_config(str(path))
    assert cfg.pretrained_model_name_or_path == "m/x" and cfg.data_paths == ["a.json", "b.json"]
    assert cfg.lr == pytest.approx(2e-4)


def test_train_help_documents_every_key():
    cp = run_cli("train", "--help")
    assert cp.returncode == 0
    for key in FIELDS:
        assert key in cp.stdout
