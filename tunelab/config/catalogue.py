"""Built-in configs: generated from model families x algorithms x datasets x suffixes, never copied by hand.

Names read `{model}_{algorithm}_{dataset}_e{epochs}[_suffix]`, as in the XTuner tutorial: `internlm_chat_7b`
(no `chat`/`instruct`/`it` means the base model), `qlora`, `oasst1`, 3 epochs, `_gpu8` for 8 GPUs.
Which combinations exist is decided by RECIPES below; `tunelab list-cfg` lists the result.
"""
from __future__ import annotations

import copy
from typing import Any

# model key -> hub id, prompt template (tunelab/config/templates.py), whether the family needs
# trust_remote_code, and its nominal size in billions of parameters (as in the model's name).
# Base (non-chat) models use the 'default' template, as XTuner does; chat models their own.
_TUTORIAL_FAMILIES: dict[str, dict[str, Any]] = {  # the families of the XTuner 0.1.x tutorial
    "internlm_7b": dict(hub="internlm/internlm-7b", template="default", remote=True, size=7),
    "internlm_chat_7b": dict(hub="internlm/internlm-chat-7b", template="internlm_chat", remote=True, size=7),
    "internlm_20b": dict(hub="internlm/internlm-20b", template="default", remote=True, size=20),
    "internlm_chat_20b": dict(hub="internlm/internlm-chat-20b", template="internlm_chat", remote=True, size=20),
    "llama_7b": dict(hub="huggyllama/llama-7b", template="default", remote=False, size=7),
    "llama2_7b": dict(hub="meta-llama/Llama-2-7b-hf", template="default", remote=False, size=7),
    "llama2_7b_chat": dict(hub="meta-llama/Llama-2-7b-chat-hf", template="llama2_chat", remote=False, size=7),
    "llama2_13b": dict(hub="meta-llama/Llama-2-13b-hf", template="default", remote=False, size=13),
    "llama2_13b_chat": dict(hub="meta-llama/Llama-2-13b-chat-hf", template="llama2_chat", remote=False, size=13),
    "llama2_70b": dict(hub="meta-llama/Llama-2-70b-hf", template="default", remote=False, size=70),
    "llama2_70b_chat": dict(hub="meta-llama/Llama-2-70b-chat-hf", template="llama2_chat", remote=False, size=70),
    "chatglm2_6b": dict(hub="THUDM/chatglm2-6b", template="chatglm2", remote=True, size=6),
    "chatglm3_6b_base": dict(hub="THUDM/chatglm3-6b-base", template="default", remote=True, size=6),
    "chatglm3_6b": dict(hub="THUDM/chatglm3-6b", template="chatglm3", remote=True, size=6),
    "qwen_7b": dict(hub="Qwen/Qwen-7B", template="default", remote=True, size=7),
    "qwen_7b_chat": dict(hub="Qwen/Qwen-7B-Chat", template="qwen_chat", remote=True, size=7),
    "qwen_14b": dict(hub="Qwen/Qwen-14B", template="default", remote=True, size=14),
    "qwen_14b_chat": dict(hub="Qwen/Qwen-14B-Chat", template="qwen_chat", remote=True, size=14),
    "baichuan_7b": dict(hub="baichuan-inc/Baichuan-7B", template="default", remote=True, size=7),
    "baichuan_13b_base": dict(hub="baichuan-inc/Baichuan-13B-Base", template="default", remote=True, size=13),
    "baichuan_13b_chat": dict(hub="baichuan-inc/Baichuan-13B-Chat", template="baichuan_chat", remote=True, size=13),
    "baichuan2_7b_base": dict(hub="baichuan-inc/Baichuan2-7B-Base", template="default", remote=True, size=7),
    "baichuan2_7b_chat": dict(hub="baichuan-inc/Baichuan2-7B-Chat", template="baichuan2_chat", remote=True, size=7),
    "baichuan2_13b_base": dict(hub="baichuan-inc/Baichuan2-13B-Base", template="default", remote=True, size=13),
    "baichuan2_13b_chat": dict(hub="baichuan-inc/Baichuan2-13B-Chat", template="baichuan2_chat", remote=True,
                               size=13),
    "zephyr_7b_beta": dict(hub="HuggingFaceH4/zephyr-7b-beta", template="zephyr", remote=False, size=7),
}
_TODAY_FAMILIES: dict[str, dict[str, Any]] = {  # the families users pick today
    "internlm2_chat_7b": dict(hub="internlm/internlm2-chat-7b", template="internlm2_chat", remote=True, size=7),
    "internlm2_chat_20b": dict(hub="internlm/internlm2-chat-20b", template="internlm2_chat", remote=True, size=20),
    "internlm2_5_chat_7b": dict(hub="internlm/internlm2_5-7b-chat", template="internlm2_chat", remote=True, size=7),
    "internlm3_8b_instruct": dict(hub="internlm/internlm3-8b-instruct", template="internlm2_chat", remote=True,
                                  size=8),
    "qwen1_5_0_5b_chat": dict(hub="Qwen/Qwen1.5-0.5B-Chat", template="qwen_chat", remote=False, size=0.5),
    "qwen1_5_7b_chat": dict(hub="Qwen/Qwen1.5-7B-Chat", template="qwen_chat", remote=False, size=7),
    "qwen1_5_14b_chat": dict(hub="Qwen/Qwen1.5-14B-Chat", template="qwen_chat", remote=False, size=14),
    "qwen2_1_5b_instruct": dict(hub="Qwen/Qwen2-1.5B-Instruct", template="qwen_chat", remote=False, size=1.5),
    "qwen2_7b_instruct": dict(hub="Qwen/Qwen2-7B-Instruct", template="qwen_chat", remote=False, size=7),
    "qwen2_72b_instruct": dict(hub="Qwen/Qwen2-72B-Instruct", template="qwen_chat", remote=False, size=72),
    "qwen2_5_0_5b_instruct": dict(hub="Qwen/Qwen2.5-0.5B-Instruct", template="qwen_chat", remote=False, size=0.5),
    "qwen2_5_1_5b_instruct": dict(hub="Qwen/Qwen2.5-1.5B-Instruct", template="qwen_chat", remote=False, size=1.5),
    "qwen2_5_3b_instruct": dict(hub="Qwen/Qwen2.5-3B-Instruct", template="qwen_chat", remote=False, size=3),
    "qwen2_5_7b_instruct": dict(hub="Qwen/Qwen2.5-7B-Instruct", template="qwen_chat", remote=False, size=7),
    "qwen2_5_14b_instruct": dict(hub="Qwen/Qwen2.5-14B-Instruct", template="qwen_chat", remote=False, size=14),
    "qwen2_5_32b_instruct": dict(hub="Qwen/Qwen2.5-32B-Instruct", template="qwen_chat", remote=False, size=32),
    "qwen2_5_72b_instruct": dict(hub="Qwen/Qwen2.5-72B-Instruct", template="qwen_chat", remote=False, size=72),
    # Qwen3's post-trained (hybrid thinking) models carry no -Chat/-Instruct suffix; trained in non-thinking mode
    "qwen3_0_6b": dict(hub="Qwen/Qwen3-0.6B", template="qwen3", remote=False, size=0.6),
    "qwen3_1_7b": dict(hub="Qwen/Qwen3-1.7B", template="qwen3", remote=False, size=1.7),
    "qwen3_4b": dict(hub="Qwen/Qwen3-4B", template="qwen3", remote=False, size=4),
    "qwen3_8b": dict(hub="Qwen/Qwen3-8B", template="qwen3", remote=False, size=8),
    "qwen3_14b": dict(hub="Qwen/Qwen3-14B", template="qwen3", remote=False, size=14),
    "qwen3_32b": dict(hub="Qwen/Qwen3-32B", template="qwen3", remote=False, size=32),
    "llama3_8b_instruct": dict(hub="meta-llama/Meta-Llama-3-8B-Instruct", template="llama3_chat", remote=False,
                               size=8),
    "llama3_70b_instruct": dict(hub="meta-llama/Meta-Llama-3-70B-Instruct", template="llama3_chat", remote=False,
                                size=70),
    "llama3_1_8b_instruct": dict(hub="meta-llama/Llama-3.1-8B-Instruct", template="llama3_chat", remote=False,
                                 size=8),
    "llama3_1_70b_instruct": dict(hub="meta-llama/Llama-3.1-70B-Instruct", template="llama3_chat", remote=False,
                                  size=70),
    "llama3_2_1b_instruct": dict(hub="meta-llama/Llama-3.2-1B-Instruct", template="llama3_chat", remote=False,
                                 size=1),
    "llama3_2_3b_instruct": dict(hub="meta-llama/Llama-3.2-3B-Instruct", template="llama3_chat", remote=False,
                                 size=3),
    "mistral_7b_instruct_v0_2": dict(hub="mistralai/Mistral-7B-Instruct-v0.2", template="mistral", remote=False,
                                     size=7),
    "mistral_7b_instruct_v0_3": dict(hub="mistralai/Mistral-7B-Instruct-v0.3", template="mistral_v3", remote=False,
                                     size=7),
    "ministral_8b_instruct_2410": dict(hub="mistralai/Ministral-8B-Instruct-2410", template="mistral_tekken",
                                       remote=False, size=8),
    "mistral_nemo_instruct_2407": dict(hub="mistralai/Mistral-Nemo-Instruct-2407", template="mistral_tekken",
                                       remote=False, size=12),
    "mixtral_8x7b_instruct": dict(hub="mistralai/Mixtral-8x7B-Instruct-v0.1", template="mixtral", remote=False,
                                  size=47),
    "gemma_2b_it": dict(hub="google/gemma-2b-it", template="gemma", remote=False, size=2),
    "gemma_7b_it": dict(hub="google/gemma-7b-it", template="gemma", remote=False, size=7),
    "gemma2_2b_it": dict(hub="google/gemma-2-2b-it", template="gemma", remote=False, size=2),
    "gemma2_9b_it": dict(hub="google/gemma-2-9b-it", template="gemma", remote=False, size=9),
    "gemma2_27b_it": dict(hub="google/gemma-2-27b-it", template="gemma", remote=False, size=27),
    # Gemma 3 text-and-image models, trained here on text only (the 1B is text only)
    "gemma3_1b_it": dict(hub="google/gemma-3-1b-it", template="gemma3", remote=False, size=1),
    "gemma3_4b_it": dict(hub="google/gemma-3-4b-it", template="gemma3", remote=False, size=4),
    "gemma3_12b_it": dict(hub="google/gemma-3-12b-it", template="gemma3", remote=False, size=12),
    "gemma3_27b_it": dict(hub="google/gemma-3-27b-it", template="gemma3", remote=False, size=27),
    "phi3_mini_4k_instruct": dict(hub="microsoft/Phi-3-mini-4k-instruct", template="phi3_chat", remote=False,
                                  size=3.8),
    "phi3_5_mini_instruct": dict(hub="microsoft/Phi-3.5-mini-instruct", template="phi3_chat", remote=False,
                                 size=3.8),
    "phi4_mini_instruct": dict(hub="microsoft/Phi-4-mini-instruct", template="phi4_mini", remote=False, size=3.8),
    "phi4": dict(hub="microsoft/phi-4", template="phi4", remote=False, size=14),
    "deepseek_llm_7b_chat": dict(hub="deepseek-ai/deepseek-llm-7b-chat", template="deepseek", remote=False, size=7),
    "deepseek_v2_lite_chat": dict(hub="deepseek-ai/DeepSeek-V2-Lite-Chat", template="deepseek_v2", remote=True,
                                  size=16),
    "yi_6b_chat": dict(hub="01-ai/Yi-6B-Chat", template="yi_chat", remote=False, size=6),
    "yi_34b_chat": dict(hub="01-ai/Yi-34B-Chat", template="yi_chat", remote=False, size=34),
    "minicpm_2b_sft": dict(hub="openbmb/MiniCPM-2B-sft-bf16", template="minicpm", remote=True, size=2.7),
    "glm4_9b_chat": dict(hub="THUDM/glm-4-9b-chat", template="glm4_chat", remote=True, size=9),
}
FAMILIES: dict[str, dict[str, Any]] = {**_TUTORIAL_FAMILIES, **_TODAY_FAMILIES}

EVALUATION_INPUTS = ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]

_ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately "
                  "completes the request.\n")
_CODER_SYSTEM = ("You are a professional programer. Please provide the corresponding code based on the "
                 "description of Human.\n")
_AGENT_SYSTEM = (  # tools and ReAct reply format for the MSAgent-Bench configs (records carry their own system)
    "你是一个可以调用外部工具的助手，可以使用的工具包括：GoogleSearch（从谷歌搜索结果中找到简短明了的回答，"
    "输入一个搜索查询）和 PythonInterpreter（执行一个名为 solution 的 Python 函数并返回结果）。\n"
    "如果使用工具，请按以下格式回复：\nThought:思考当前步骤要解决什么问题，是否需要使用工具\n"
    "Action:工具名称，必须从 ['GoogleSearch', 'PythonInterpreter'] 中选择\nAction Input:工具输入参数\n"
    "工具返回的结果格式为：\nResponse:调用工具后的结果\n"
    "如果你已经知道答案，或者不需要工具，请按以下格式回复：\nThought:给出最终答案的思考过程\n"
    "Final Answer:最终答案\n开始!\n")

# silk-road/alpaca-data-gpt4-chinese holds the English original beside the translation: train on the *_zh side
_ALPACA_ZH = {"instruction_zh": "instruction", "input_zh": "input", "output_zh": "output"}

# dataset key -> its epochs (in the name) and the config settings it brings. Hub ids are Hugging Face
# dataset ids; ./ paths are local files the user downloads (as in the tutorial).
DATASETS: dict[str, dict[str, Any]] = {
    "alpaca": dict(epochs=3, data_path="tatsu-lab/alpaca", SYSTEM=_ALPACA_SYSTEM),
    "alpaca_zh": dict(epochs=3, data_path="silk-road/alpaca-data-gpt4-chinese", SYSTEM=_ALPACA_SYSTEM,
                      dataset_columns=_ALPACA_ZH),
    "alpaca_enzh": dict(epochs=3, data_path=["tatsu-lab/alpaca", "silk-road/alpaca-data-gpt4-chinese"],
                        SYSTEM=_ALPACA_SYSTEM, dataset_columns={"silk-road/alpaca-data-gpt4-chinese": _ALPACA_ZH}),
    "oasst1": dict(epochs=3, data_path="timdettmers/openassistant-guanaco", SYSTEM=""),
    "code_alpaca": dict(epochs=3, data_path="HuggingFaceH4/CodeAlpaca_20K", SYSTEM=_CODER_SYSTEM,
                        dataset_columns={"prompt": "query", "completion": "response"}, evaluation_inputs=[
        "写一个Python函数，将十六进制颜色代码（如#0066ee）转换为对应的红、绿、蓝（RGB）三个颜色分量值，并以元组的形式返回。",
        "Write a Python function that takes a hexadecimal color code (e.g., #0066ee) as input and converts it "
        "into the corresponding red, green, and blue (RGB) color component values, returned as a tuple."]),
    "sql": dict(epochs=3, data_path="b-mc2/sql-create-context",  # alpaca layout: "context\nquestion"
                dataset_columns={"context": "instruction", "question": "input", "answer": "output"},
                SYSTEM="If you are an expert in SQL, please generate a good SQL Query for Question based on the "
                       "CREATE TABLE statement.\n",
                evaluation_inputs=["CREATE TABLE station (name VARCHAR, lat VARCHAR, city VARCHAR)\n"
                                   "Find the name, latitude, and city of stations with latitude above 50."]),
    "colorist": dict(epochs=5, data_path="burkelibbey/colors",
                     dataset_columns={"description": "query", "color": "response"},
                     SYSTEM="You are a professional color designer. Please provide the corresponding colors based "
                            "on the description of Human.\n",
                     evaluation_inputs=["请给我一个像天空一样清澈透明的蓝色。", "Please give me a clear blue like the sky."]),
    "lawyer": dict(epochs=3, data_path=["./data/CrimeKgAssitant清洗后_52k.json", "./data/训练数据_带法律依据_92k.json"],
                   dataset_columns={"./data/CrimeKgAssitant清洗后_52k.json": {"input": "query", "output": "response"},
                                    "./data/训练数据_带法律依据_92k.json": {"question": "query", "answer": "response"}},
                   SYSTEM="你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n",
                   evaluation_inputs=["请问离婚需要准备什么材料？", "销售鳄鱼皮包违法吗？"]),
    "arxiv_gentitle": dict(epochs=3, data_path="./data/arxiv_data.json",
                           dataset_columns={"abstract": "query", "title": "response"},
                           SYSTEM="If you are an expert in writing papers, please generate a good paper title for "
                                  "this paper based on other authors' descriptions of their abstracts.\n"),
    "medical": dict(epochs=1, data_path="shibing624/medical",
                    SYSTEM="如果你是一名医生，请根据患者的描述回答医学问题。\n",
                    evaluation_inputs=["我有家族遗传性的过敏，请问可以献血吗？", "我爷爷有高血压，请问他可以喝咖啡吗？"]),
    "openorca": dict(epochs=1, data_path="Open-Orca/OpenOrca", SYSTEM="",
                     dataset_columns={"system_prompt": "system", "question": "query"}),
    "wizardlm": dict(epochs=1, data_path="WizardLM/WizardLM_evol_instruct_V2_196k", SYSTEM=""),
    "msagent_react": dict(epochs=3, data_path="damo/MSAgent-Bench", SYSTEM=_AGENT_SYSTEM, pack_to_max_length=False,
                          evaluation_inputs=["上海明天天气怎么样？"]),
    "medqa2019": dict(epochs=3, data_path="./MedQA2019-structured-train.jsonl",
                      SYSTEM="You are a professional, highly experienced doctor professor. You always provide "
                             "accurate, comprehensive, and detailed answers based on the patients' questions.",
                      evaluation_inputs=["What are the side effects of ibuprofen?",
                                         "How should I store insulin?"]),
    # a small identity set ({{NAME}}/{{AUTHOR}} placeholders): short packs and few accumulation steps so that
    # ~100 records still give tens of optimizer steps
    "self_cognition": dict(epochs=10, data_path="./self_cognition.jsonl", SYSTEM="",
                           data_placeholders={"NAME": "tunelab assistant", "AUTHOR": "tunelab"},
                           max_length=512, accumulative_counts=4, evaluation_freq=20,
                           evaluation_inputs=["你是谁", "who are you"]),
    # preference pairs (prompt, chosen and rejected conversations) of UltraFeedback, cleaned and binarized by Argilla
    "dpo_ultrafeedback": dict(epochs=1, data_path="argilla/ultrafeedback-binarized-preferences-cleaned", SYSTEM="",
                              objective="dpo", pref_beta=0.1, validation_split=0.01),
    "orpo_ultrafeedback": dict(epochs=1, data_path="argilla/ultrafeedback-binarized-preferences-cleaned", SYSTEM="",
                               objective="orpo", orpo_lambda=0.1, validation_split=0.01),
}
# Preference training moves a trained chat model a little: its learning rate per algorithm (in place of
# ALGORITHMS's SFT rate), as LLaMA-Factory's and TRL's DPO examples use
PREFERENCE_LR = {"qlora": 5e-5, "lora": 5e-5, "full": 5e-7}

# algorithm -> optimisation settings (XTuner's published defaults)
ALGORITHMS: dict[str, dict[str, Any]] = {
    "qlora": dict(algorithm="qlora", lr=2e-4, lora_r=64, lora_alpha=16, lora_dropout=0.1),
    "lora": dict(algorithm="lora", lr=2e-4, lora_r=64, lora_alpha=16, lora_dropout=0.1),
    "full": dict(algorithm="full", lr=2e-5),
}

# suffix -> number of GPUs the variant is for. The per-device batch stays 1 and accumulative_counts is
# divided by the GPU count, so the global batch (batch_size x accumulative_counts x GPUs) stays that of
# the 1-GPU config: 1 x 16 x 1 == 1 x 2 x 8. (XTuner's own *_gpu8 files used batch_size 8 and
# accumulative_counts 1, a global batch of 64; tunelab keeps the 1-GPU recipe's optimisation instead.)
SUFFIXES: dict[str, int] = {"": 1, "gpu8": 8}

# Settings every generated config starts from (a dataset may override them).
COMMON: dict[str, Any] = dict(max_length=2048, pack_to_max_length=True, batch_size=1, accumulative_counts=16,
                              evaluation_inputs=EVALUATION_INPUTS, evaluation_freq=500)

_ALL = list(FAMILIES)
_CHAT = [k for k, f in FAMILIES.items() if f["template"] != "default"]
_SMALL = [k for k, f in FAMILIES.items() if f["size"] <= 8]  # full fine-tuning only up to 8B
_SHOWCASE = ["internlm_7b", "internlm_chat_7b", "internlm_20b", "llama2_7b", "qwen_7b", "baichuan2_7b_base",
             "chatglm3_6b", "internlm2_chat_7b", "qwen2_5_7b_instruct", "llama3_8b_instruct"]
_PREFERENCE = ["qwen2_5_1_5b_instruct", "qwen2_5_7b_instruct", "qwen3_8b", "llama3_8b_instruct", "llama3_1_8b_instruct",
               "mistral_7b_instruct_v0_3", "gemma2_9b_it", "internlm2_5_chat_7b", "phi3_5_mini_instruct",
               "glm4_9b_chat"]
_AGENTS = ["internlm_7b", "internlm_chat_7b", "internlm_20b", "llama2_7b", "qwen_7b", "baichuan2_7b_base",
           "internlm2_chat_7b", "qwen2_5_7b_instruct", "llama3_8b_instruct", "glm4_9b_chat"]

# Which combinations exist: (algorithm, model keys, dataset keys, suffixes).
RECIPES: list[tuple[str, list[str], list[str], list[str]]] = [
    ("qlora", _ALL, ["alpaca", "alpaca_zh", "oasst1"], [""]),
    ("qlora", _CHAT, ["self_cognition"], [""]),
    ("qlora", _SHOWCASE, ["alpaca_enzh", "code_alpaca", "sql", "colorist", "lawyer", "arxiv_gentitle", "medical",
                          "medqa2019", "openorca", "wizardlm"], [""]),
    ("qlora", _AGENTS, ["msagent_react"], ["", "gpu8"]),
    ("lora", [k for k in _TODAY_FAMILIES if k in _SMALL], ["alpaca"], [""]),
    ("full", _SMALL, ["alpaca"], [""]),
    ("qlora", _PREFERENCE, ["dpo_ultrafeedback", "orpo_ultrafeedback"], [""]),
    ("lora", [k for k in _PREFERENCE if k in _SMALL], ["dpo_ultrafeedback"], [""]),
]

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


# DPO on the same tiny model: pairs whose chosen answers are helpful ("Sure! ... Happy to help.") and rejected
# ones rude; a fifth of the pairs is held out, and the reward accuracy on them rises from chance. A random model
# has no answers of its own for DPO to rank, so the chosen answers' next-token loss comes along (pref_ftx)
DEMO_DPO: dict[str, Any] = dict(
    DEMO, objective="dpo", data_path="builtin:preference_demo", prompt_template="default", max_length=256,
    max_epochs=12, lr=1e-3, pref_beta=0.1, pref_ftx=1.0, validation_split=0.2, evaluation_freq=12, save_steps=12,
    evaluation_inputs=["What is the capital of Spain?", "How many legs does a cat have?"],
    evaluation_max_new_tokens=24)


def config_name(model: str, algorithm: str, dataset: str, suffix: str = "") -> str:
    """`{model}_{algorithm}_{dataset}_e{epochs}[_suffix]`."""
    name = f"{model}_{algorithm}_{dataset}_e{DATASETS[dataset]['epochs']}"
    return f"{name}_{suffix}" if suffix else name


def make_config(model: str, algorithm: str, dataset: str, suffix: str = "") -> dict[str, Any]:
    """The settings of one built-in config (fresh copies: callers may mutate them)."""
    fam, gpus = FAMILIES[model], SUFFIXES[suffix]
    if algorithm == "full" and fam["size"] > 8:
        raise ValueError(f"{model}: full fine-tuning configs are only built for models of at most 8B")
    values: dict[str, Any] = dict(COMMON, pretrained_model_name_or_path=fam["hub"], trust_remote_code=fam["remote"],
                                  prompt_template=fam["template"])
    values.update({k: v for k, v in DATASETS[dataset].items() if k != "epochs"})
    values["max_epochs"] = DATASETS[dataset]["epochs"]
    values.update(ALGORITHMS[algorithm])
    if "objective" in DATASETS[dataset]:
        values["lr"] = PREFERENCE_LR[algorithm]
    if values["accumulative_counts"] % gpus:
        raise ValueError(f"{model}/{dataset}: accumulative_counts {values['accumulative_counts']} does not "
                         f"split over {gpus} GPUs")
    values["accumulative_counts"] //= gpus
    return copy.deepcopy(values)


def _generate() -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {
        "demo": DEMO,
        "demo_qlora": dict(DEMO, algorithm="qlora", lr=2e-3, max_epochs=160),  # a 4-bit base learns slower
        "demo_full": dict(DEMO, algorithm="full", lr=5e-4),
        "demo_dpo": DEMO_DPO,
    }
    for algorithm, models, datasets, suffixes in RECIPES:
        for model in models:
            for dataset in datasets:
                for suffix in suffixes:
                    configs[config_name(model, algorithm, dataset, suffix)] = make_config(
                        model, algorithm, dataset, suffix)
    return dict(sorted(configs.items()))


BUILTIN: dict[str, dict[str, Any]] = _generate()
