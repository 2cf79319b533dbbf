"""Config files of other tools: an XTuner 0.1.x config is read without running it and trains; LLaMA-Factory
YAML and DeepSpeed JSON files are named for what they are, in one line with exit code 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

# The shape of the InternLM tutorial's internlm_chat_7b_qlora_oasst1_e3.py (XTuner 0.1.x), with the tutorial's
# custom-data edit (load_dataset('json', data_files=...)) and small numbers. xtuner and mmengine are not
# installed: running this file would fail at its first import.
XTUNER_CONFIG = '''# Copyright (c) OpenMMLab. All rights reserved.
import torch
from bitsandbytes.optim import PagedAdamW32bit
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR
from peft import LoraConfig
from transformers import (AutoModelForCausalLM, AutoTokenizer,
                          BitsAndBytesConfig)

from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import alpaca_map_fn, template_map_fn_factory
from xtuner.engine import DatasetInfoHook, EvaluateChatHook
from xtuner.model import SupervisedFinetune
from xtuner.utils import PROMPT_TEMPLATE

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = {model!r}

# Data
data_path = {data!r}
prompt_template = PROMPT_TEMPLATE.internlm_chat
max_length = 128
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 1  # per_device
accumulative_counts = 2
dataloader_num_workers = 0
max_epochs = 1
optim_type = PagedAdamW32bit
lr = 3e-4
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # grad clip

# Evaluate the generation performance during the training
evaluation_freq = 2
SYSTEM = ''
evaluation_inputs = ['请给我介绍五个上海的景点']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    trust_remote_code=True,
    padding_side='right')

model = dict(
    type=SupervisedFinetune,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=True,
        torch_dtype=torch.float16,
        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            load_in_8bit=False,
            llm_int8_threshold=6.0,
            llm_int8_has_fp16_weight=False,
            bnb_4bit_compute_dtype=torch.float16,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type='nf4')),
    lora=dict(
        type=LoraConfig,
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        bias='none',
        task_type='CAUSAL_LM'))

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path='json', data_files=dict(train=data_path)),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=alpaca_map_fn,
    template_map_fn=dict(
        type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(
        type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='float16')

param_scheduler = dict(
    type=CosineAnnealingLR,
    eta_min=0.0,
    by_epoch=True,
    T_max=max_epochs,
    convert_to_iter_based=True)

train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(
        type=EvaluateChatHook,
        tokenizer=tokenizer,
        every_n_iters=evaluation_freq,
        evaluation_inputs=evaluation_inputs,
        system=SYSTEM,
        prompt_template=prompt_template)
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, interval=1),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
'''


def _one_error_line(cp) -> str:
    assert cp.returncode == 2, (cp.returncode, cp.stderr[-2000:])
    lines = [line for line in cp.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in cp.stderr, cp.stderr
    return lines[0]


@pytest.fixture()
def xtuner_config(tiny_llama, data_dir, tmp_path) -> Path:
    path = tmp_path / "internlm_chat_7b_qlora_alpaca_e1_copy.py"
    path.write_text(XTUNER_CONFIG.format(model=str(tiny_llama),
                                         data=str(data_dir / "alpaca" / "alpaca_data_first102.json")),
                    encoding="utf-8")
    return path


@pytest.mark.slow
def test_xtuner_config_is_read_without_running_it(xtuner_config, tmp_path):
    """check-custom-dataset takes the data settings from the file; the log line says what was taken/ignored."""
    cp = run_cli("check-custom-dataset", xtuner_config, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "prompt_template internlm_chat, max_length 128" in cp.stdout
    assert "format alpaca, 102 records" in cp.stdout
    said = next(line for line in cp.stderr.splitlines() if "read as an XTuner config" in line)
    taken, ignored = said.split("; took ")[1].split("; ignored ")
    assert set(taken.split(", ")) == {
        "pretrained_model_name_or_path", "data_path", "max_length", "pack_to_max_length", "batch_size",
        "accumulative_counts", "max_epochs", "lr", "betas", "weight_decay", "max_norm", "evaluation_freq",
        "evaluation_inputs", "SYSTEM", "prompt_template", "algorithm", "trust_remote_code", "lora_r",
        "lora_alpha", "lora_dropout", "dataset_format"}
    assert {"dataloader_num_workers", "optim_type", "tokenizer", "optim_wrapper", "custom_hooks",
            "randomness"} <= set(ignored.split(", "))


@pytest.mark.slow
def test_training_from_an_xtuner_config(xtuner_config, tmp_path):
    """QLoRA with the file's r/alpha/dropout, template and evaluation inputs; the run's config says so."""
    work = tmp_path / "work"
    cp = run_cli("train", xtuner_config, "--work-dir", work, "--cfg-options", "max_steps=2", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "algorithm qlora" in cp.stderr and "请给我介绍五个上海的景点 ->" in cp.stderr
    adapter = json.loads((work / "hf" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (8, 16, 0.05)
    resolved = (work / f"{xtuner_config.stem}.py").read_text()
    for line in ("prompt_template = 'internlm_chat'", "dataset_format = 'alpaca'", "lr = 0.0003",
                 "accumulative_counts = 2", "trust_remote_code = True"):
        assert line in resolved


def test_llama_factory_yaml_is_named(tmp_path):
    cfg = tmp_path / "llama3_lora_sft.yaml"
    cfg.write_text("### model\nmodel_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct\n\n### method\n"
                   "stage: sft\ndo_train: true\nfinetuning_type: lora\nlora_target: all\n\n### dataset\n"
                   "dataset: identity,alpaca_en_demo\ntemplate: llama3\ncutoff_len: 2048\n", encoding="utf-8")
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert "this is a LLaMA-Factory YAML config" in line and "tunelab copy-cfg" in line


def test_deepspeed_json_is_named_and_pointed_at_the_flag(tmp_path):
    cfg = tmp_path / "ds_z2.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                               "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}), encoding="utf-8")
    line = _one_error_line(run_cli("train", cfg, cwd=tmp_path))
    assert "this is a DeepSpeed config" in line and f"--deepspeed {cfg}" in line
