"""Built-in configs: generated from model families x algorithms x datasets, never copied by hand.

Names read `{model}_{algorithm}_{dataset}_e{epochs}[_suffix]`, as in the XTuner tutorial.
"""
from __future__ import annotations

from typing import Any

# model key -> hub id, prompt template, whether the family needs trust_remote_code
FAMILIES: dict[str, dict[str, Any]] = {
    "internlm_7b": dict(hub="internlm/internlm-7b", template="default", remote=True),
    "internlm_chat_7b": dict(hub="internlm/internlm-chat-7b", template="internlm_chat", remote=True),
    "internlm_20b": dict(hub="internlm/internlm-20b", template="default", remote=True),
    "internlm_chat_20b": dict(hub="internlm/internlm-chat-20b", template="internlm_chat", remote=True),
    "internlm2_chat_7b": dict(hub="internlm/internlm2-chat-7b", template="internlm2_chat", remote=True),
    "llama2_7b_chat": dict(hub="meta-llama/Llama-2-7b-chat-hf", template="llama2_chat", remote=False),
    "qwen_7b_chat": dict(hub="Qwen/Qwen-7B-Chat", template="qwen_chat", remote=True),
    "qwen2_5_7b_instruct": dict(hub="Qwen/Qwen2.5-7B-Instruct", template="qwen_chat", remote=False),
}

# dataset key -> data settings and the epochs the tutorial uses
DATASETS: dict[str, dict[str, Any]] = {
    "oasst1": dict(data_path="timdettmers/openassistant-guanaco", epochs=3, SYSTEM=""),
    "alpaca": dict(data_path="tatsu-lab/alpaca", epochs=3,
                   SYSTEM="Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n"),
    "medqa2019": dict(data_path="./MedQA2019-structured-train.jsonl", epochs=3, SYSTEM=""),
}

# algorithm -> optimisation settings (XTuner's published defaults)
ALGORITHMS: dict[str, dict[str, Any]] = {
    "qlora": dict(algorithm="qlora", lr=2e-4, lora_r=64, lora_alpha=16, lora_dropout=0.1),
    "lora": dict(algorithm="lora", lr=2e-4, lora_r=64, lora_alpha=16, lora_dropout=0.1),
    "full": dict(algorithm="full", lr=2e-5),
}

EVALUATION_INPUTS = ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]

# The embedded default: a tiny random Llama built locally, fine-tuned on tunelab's own self-cognition
# data in well under 3 minutes on 2 CPU cores. Real work points pretrained_model_name_or_path at a real model.
DEMO: dict[str, Any] = dict(
    pretrained_model_name_or_path="builtin:tiny-llama",
    algorithm="lora",
    data_path="builtin:self_cognition",
    prompt_template="internlm_chat",
    max_length=512,
    pack_to_max_length=True,
    batch_size=1,
    accumulative_counts=4,
    max_epochs=80,
    lr=1e-3,
    warmup_ratio=0.05,
    lora_r=32,
    lora_alpha=64,
    lora_dropout=0.0,
    gradient_checkpointing=False,
    evaluation_inputs=["who are you", "你是谁"],
    evaluation_freq=40,
    evaluation_max_new_tokens=80,
    save_steps=40,
    save_total_limit=2,
    log_interval=10,
)


def _generate() -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {
        "demo": DEMO,
        "demo_qlora": dict(DEMO, algorithm="qlora", lr=2e-3, max_epochs=160),  # a 4-bit base learns slower
        "demo_full": dict(DEMO, algorithm="full", lr=5e-4),
    }
    for model, fam in FAMILIES.items():
        for algo, algo_settings in ALGORITHMS.items():
            for ds, ds_settings in DATASETS.items():
                name = f"{model}_{algo}_{ds}_e{ds_settings['epochs']}"
                configs[name] = dict(
                    pretrained_model_name_or_path=fam["hub"], trust_remote_code=fam["remote"],
                    prompt_template=fam["template"], data_path=ds_settings["data_path"],
                    SYSTEM=ds_settings["SYSTEM"], max_epochs=ds_settings["epochs"], max_length=2048,
                    batch_size=1, accumulative_counts=16, evaluation_inputs=EVALUATION_INPUTS,
                    evaluation_freq=500, **algo_settings)
    return dict(sorted(configs.items()))


BUILTIN: dict[str, dict[str, Any]] = _generate()
