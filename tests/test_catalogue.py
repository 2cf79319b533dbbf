"""The built-in catalogue: generated names, every config valid, copy-cfg round trips, tutorial names."""
from __future__ import annotations

import re

import pytest

from conftest import run_cli
from tunelab.config import catalogue
from tunelab.config.catalogue import ALGORITHMS, BUILTIN, DATASETS, DEMO, FAMILIES, SUFFIXES
from tunelab.config.loader import load_config, read_config_file, render_config
from tunelab.config.schema import FIELDS, default_value, to_dict
from tunelab.config.templates import TEMPLATES

DEMOS = ("demo", "demo_qlora", "demo_full", "demo_dpo")
GENERATED = sorted(set(BUILTIN) - set(DEMOS))
NAME = re.compile(r"^(?P<model>[a-z0-9_]+?)_(?P<algorithm>full|lora|qlora)_(?P<dataset>[a-z0-9_]+?)"
                  r"_e(?P<epochs>[1-9][0-9]*)(?:_(?P<suffix>[a-z0-9]+))?$")
TUTORIAL = ("internlm_chat_7b_qlora_oasst1_e3", "internlm_7b_qlora_msagent_react_e3_gpu8")

# ~20 configs across families, algorithms, datasets and suffixes (lists, dicts, Chinese text, gpu8)
SAMPLE = [
    "internlm_chat_7b_qlora_oasst1_e3", "internlm_7b_qlora_msagent_react_e3_gpu8", "internlm_20b_qlora_lawyer_e3",
    "llama_7b_full_alpaca_e3",
    "llama2_70b_qlora_oasst1_e3", "llama2_7b_chat_qlora_self_cognition_e10", "chatglm2_6b_qlora_alpaca_zh_e3",
    "chatglm3_6b_qlora_sql_e3", "qwen_7b_qlora_alpaca_enzh_e3", "baichuan2_13b_chat_qlora_alpaca_e3",
    "zephyr_7b_beta_full_alpaca_e3", "internlm2_5_chat_7b_lora_alpaca_e3", "qwen2_5_72b_instruct_qlora_oasst1_e3",
    "qwen3_8b_qlora_self_cognition_e10", "llama3_8b_instruct_qlora_colorist_e5",
    "mixtral_8x7b_instruct_qlora_alpaca_zh_e3", "gemma2_9b_it_qlora_alpaca_e3", "phi3_mini_4k_instruct_full_alpaca_e3",
    "deepseek_v2_lite_chat_qlora_oasst1_e3", "glm4_9b_chat_qlora_msagent_react_e3_gpu8", "demo",
]


def parse(name: str) -> dict[str, str]:
    m = NAME.match(name)
    assert m, f"{name} does not read {{model}}_{{algorithm}}_{{dataset}}_e{{epochs}}[_suffix]"
    return m.groupdict()


def test_catalogue_size_and_tutorial_names():
    assert len(BUILTIN) >= 200
    assert len(FAMILIES) >= 40 and len(DATASETS) >= 12
    for name in TUTORIAL:
        assert name in BUILTIN
    assert list(BUILTIN) == sorted(BUILTIN)


def test_demo_entries_unchanged():
    assert BUILTIN["demo"] == DEMO
    assert BUILTIN["demo_qlora"] == dict(DEMO, algorithm="qlora", lr=2e-3, max_epochs=160)
    assert BUILTIN["demo_full"] == dict(DEMO, algorithm="full", lr=5e-4)
    assert DEMO["pretrained_model_name_or_path"] == "builtin:tiny-llama"


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_validates(name):
    cfg, run_name = load_config(name)
    assert run_name == name
    assert to_dict(cfg) == {k: BUILTIN[name].get(k, default_value(k)) for k in FIELDS}


def test_names_follow_the_pattern_and_the_settings():
    for name in GENERATED:
        parts = parse(name)
        model, algorithm, dataset = parts["model"], parts["algorithm"], parts["dataset"]
        assert model in FAMILIES and dataset in DATASETS, name
        assert (parts["suffix"] or "") in SUFFIXES, name
        values, fam = BUILTIN[name], FAMILIES[model]
        assert values["max_epochs"] == int(parts["epochs"]) == DATASETS[dataset]["epochs"], name
        assert values["algorithm"] == algorithm, name
        assert values["pretrained_model_name_or_path"] == fam["hub"], name
        assert values["prompt_template"] == fam["template"], name
        assert values["trust_remote_code"] is fam["remote"], name
        assert values["data_path"] == DATASETS[dataset]["data_path"], name
        for key, value in ALGORITHMS[algorithm].items():
            if key == "lr" and "objective" in DATASETS[dataset]:  # preference training: a rate of its own
                value = catalogue.PREFERENCE_LR[algorithm]
            assert values[key] == value, (name, key)


def test_families():
    hubs = [f["hub"] for f in FAMILIES.values()]
    assert len(set(hubs)) == len(hubs)
    for model, fam in FAMILIES.items():
        assert set(fam) == {"hub", "template", "remote", "size"}, model
        assert fam["template"] in TEMPLATES, f"{model}: template {fam['template']} does not exist"
        assert re.fullmatch(r"[A-Za-z0-9-]+/[A-Za-z0-9._-]+", fam["hub"]), model
        assert isinstance(fam["remote"], bool) and fam["size"] > 0, model
    # the tutorial's families and today's
    for model in ("internlm_7b", "internlm_chat_7b", "internlm_20b", "internlm_chat_20b", "llama_7b", "llama2_7b",
                  "llama2_7b_chat", "llama2_13b_chat", "llama2_70b", "chatglm2_6b", "chatglm3_6b", "chatglm3_6b_base",
                  "qwen_7b", "qwen_7b_chat", "qwen_14b_chat", "baichuan_7b", "baichuan_13b_chat", "baichuan2_7b_base",
                  "baichuan2_13b_chat", "zephyr_7b_beta", "internlm2_chat_7b", "internlm2_chat_20b",
                  "internlm2_5_chat_7b", "internlm3_8b_instruct", "qwen1_5_7b_chat", "qwen2_7b_instruct",
                  "qwen2_5_0_5b_instruct", "qwen2_5_72b_instruct", "qwen3_8b", "llama3_8b_instruct",
                  "llama3_1_8b_instruct", "llama3_2_3b_instruct", "mistral_7b_instruct_v0_2", "mixtral_8x7b_instruct",
                  "gemma_7b_it", "gemma2_9b_it", "phi3_mini_4k_instruct", "deepseek_llm_7b_chat",
                  "deepseek_v2_lite_chat", "yi_6b_chat", "yi_34b_chat", "minicpm_2b_sft", "glm4_9b_chat"):
        assert model in FAMILIES, model
    # base models use XTuner's 'default' template, chat models their own
    assert FAMILIES["internlm_7b"]["template"] == "default" and FAMILIES["qwen_14b"]["template"] == "default"
    assert FAMILIES["internlm_chat_7b"]["template"] == "internlm_chat"
    assert FAMILIES["llama2_7b_chat"]["hub"] == "meta-llama/Llama-2-7b-chat-hf"


def test_datasets():
    assert DATASETS["oasst1"]["data_path"] == "timdettmers/openassistant-guanaco"
    assert DATASETS["alpaca"]["data_path"] == "tatsu-lab/alpaca"
    assert DATASETS["alpaca_zh"]["data_path"] == "silk-road/alpaca-data-gpt4-chinese"
    assert DATASETS["alpaca_enzh"]["data_path"] == ["tatsu-lab/alpaca", "silk-road/alpaca-data-gpt4-chinese"]
    assert DATASETS["code_alpaca"]["data_path"] == "HuggingFaceH4/CodeAlpaca_20K"
    assert DATASETS["msagent_react"]["data_path"] == "damo/MSAgent-Bench"
    assert DATASETS["medqa2019"]["data_path"] == "./MedQA2019-structured-train.jsonl"
    assert DATASETS["sql"]["data_path"] == "b-mc2/sql-create-context"
    sc = DATASETS["self_cognition"]
    assert sc["data_path"] == "./self_cognition.jsonl"
    assert sc["data_placeholders"] == {"NAME": "tunelab assistant", "AUTHOR": "tunelab"}
    for name, ds in DATASETS.items():
        assert isinstance(ds["epochs"], int) and ds["epochs"] >= 1, name
        assert set(ds) - {"epochs"} <= set(FIELDS), name  # everything else is a config key


def test_algorithms_and_full_only_up_to_8b():
    assert ALGORITHMS["qlora"] == dict(algorithm="qlora", lr=2e-4, lora_r=64, lora_alpha=16, lora_dropout=0.1)
    assert ALGORITHMS["lora"] == dict(ALGORITHMS["qlora"], algorithm="lora")
    assert ALGORITHMS["full"] == dict(algorithm="full", lr=2e-5)
    full = [n for n in GENERATED if BUILTIN[n]["algorithm"] == "full"]
    assert full
    for name in full:
        assert FAMILIES[parse(name)["model"]]["size"] <= 8, name
    with pytest.raises(ValueError, match="8B"):
        catalogue.make_config("llama2_70b", "full", "alpaca")
    assert {BUILTIN[n]["algorithm"] for n in GENERATED} == {"full", "lora", "qlora"}


def test_every_family_and_dataset_is_used():
    used = [parse(n) for n in GENERATED]
    assert {p["model"] for p in used} == set(FAMILIES)
    assert {p["dataset"] for p in used} == set(DATASETS)


def test_tutorial_config_settings():
    values = BUILTIN["internlm_chat_7b_qlora_oasst1_e3"]
    assert values["pretrained_model_name_or_path"] == "internlm/internlm-chat-7b"
    assert values["data_path"] == "timdettmers/openassistant-guanaco"
    assert (values["batch_size"], values["accumulative_counts"], values["max_length"]) == (1, 16, 2048)
    assert values["pack_to_max_length"] is True
    agent = BUILTIN["internlm_7b_qlora_msagent_react_e3_gpu8"]
    assert agent["pretrained_model_name_or_path"] == "internlm/internlm-7b"
    assert agent["data_path"] == "damo/MSAgent-Bench" and agent["pack_to_max_length"] is False


def test_gpu8_keeps_the_global_batch_of_its_one_gpu_twin():
    gpu8 = [n for n in GENERATED if n.endswith("_gpu8")]
    assert "internlm_7b_qlora_msagent_react_e3_gpu8" in gpu8
    for name in gpu8:
        twin = name.removesuffix("_gpu8")
        assert twin in BUILTIN, name
        one, eight = BUILTIN[twin], BUILTIN[name]
        assert eight["batch_size"] == one["batch_size"] == 1
        assert eight["batch_size"] * eight["accumulative_counts"] * 8 == one["batch_size"] * one["accumulative_counts"]
        assert (one["accumulative_counts"], eight["accumulative_counts"]) == (16, 2)
        assert {k: v for k, v in eight.items() if k != "accumulative_counts"} == \
               {k: v for k, v in one.items() if k != "accumulative_counts"}


def test_configs_are_independent_copies():
    a, b = BUILTIN["qwen_7b_chat_qlora_alpaca_e3"], BUILTIN["qwen_7b_qlora_alpaca_e3"]
    assert a["evaluation_inputs"] == b["evaluation_inputs"] and a["evaluation_inputs"] is not b["evaluation_inputs"]
    enzh = [BUILTIN[n]["data_path"] for n in GENERATED if "_alpaca_enzh_" in n]
    assert len(enzh) >= 2 and enzh[0] is not enzh[1] and enzh[0] is not DATASETS["alpaca_enzh"]["data_path"]


@pytest.mark.parametrize("name", SAMPLE)
def test_copy_cfg_round_trip(name, tmp_path):
    assert name in BUILTIN
    path = tmp_path / f"{name}_copy.py"
    path.write_text(render_config(BUILTIN[name], name), encoding="utf-8")
    values = read_config_file(path)
    assert set(values) == set(FIELDS)
    assert values == {k: BUILTIN[name].get(k, default_value(k)) for k in FIELDS}
    assert to_dict(load_config(str(path))[0]) == to_dict(load_config(name)[0])


def test_sample_spans_families_algorithms_and_suffixes():
    parts = [parse(n) for n in SAMPLE if n not in DEMOS]
    assert len({p["model"] for p in parts}) >= 18
    assert {p["algorithm"] for p in parts} == {"full", "lora", "qlora"}
    assert any(p["suffix"] == "gpu8" for p in parts)


def test_list_cfg_grep_msagent():
    cp = run_cli("list-cfg")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == list(BUILTIN)
    msagent = [line for line in cp.stdout.splitlines() if "msagent" in line]  # `tunelab list-cfg | grep msagent`
    assert "internlm_7b_qlora_msagent_react_e3_gpu8" in msagent
    assert all(NAME.match(line) for line in msagent)
