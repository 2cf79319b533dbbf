"""Config files of other tools. An XTuner 0.1.x config is read, never run (it imports xtuner and mmengine):
its top-level settings and the LoRA/quantisation/dataset parts of `model` and `train_dataset` are taken from
the syntax tree. LLaMA-Factory YAML and DeepSpeed JSON files are recognised and refused with one line."""
from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

# XTuner settings that mean the same in tunelab, under the same name
SAME_NAME = ("pretrained_model_name_or_path", "data_path", "max_length", "pack_to_max_length", "batch_size",
             "accumulative_counts", "max_epochs", "lr", "betas", "weight_decay", "max_norm", "warmup_ratio",
             "evaluation_freq", "evaluation_inputs", "SYSTEM", "save_steps", "save_total_limit")
# XTuner's dataset_map_fn -> the tunelab format of the records it reads
MAP_FN_FORMATS = {"oasst1_map_fn": "guanaco", "alpaca_map_fn": "alpaca", "openai_map_fn": "openai",
                  "msagent_react_map_fn": "msagent"}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv}
_LLAMA_FACTORY_KEYS = {"model_name_or_path", "stage", "do_train", "finetuning_type", "dataset", "template",
                       "cutoff_len", "lora_rank", "output_dir", "per_device_train_batch_size", "num_train_epochs"}
_DEEPSPEED_KEYS = {"zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size",
                   "gradient_accumulation_steps", "zero_allow_untested_optimizer", "bf16", "fp16"}
_HOW = "tunelab reads Python configs: `tunelab copy-cfg NAME DIR` writes one (`tunelab list-cfg` lists NAME)"


@dataclass(frozen=True)
class Opaque:
    """A value that is code rather than data (a class, a function, a call other than dict(...))."""
    text: str


@dataclass
class XTunerConfig:
    values: dict[str, Any]  # tunelab settings
    taken: list[str]        # the tunelab keys set from the file
    ignored: list[str]      # the file's top-level names (or parts) that tunelab does not use


def refuse_other_tools(path: Path, source: str) -> None:
    """ConfigError naming the tool when `path` is a LLaMA-Factory YAML or a DeepSpeed (or other) JSON file."""
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        keys = set(re.findall(r"^([A-Za-z_][\w.-]*)\s*:", source, re.MULTILINE))
        if len(keys & _LLAMA_FACTORY_KEYS) >= 2:
            raise ConfigError(f"{path}: this is a LLaMA-Factory YAML config; {_HOW}, then set its keys "
                              f"(model_name_or_path is pretrained_model_name_or_path there; `tunelab train --help` "
                              f"lists them)")
        raise ConfigError(f"{path}: a YAML file is not a tunelab config; {_HOW}")
    if suffix == ".json":
        try:
            value = json.loads(source)
        except ValueError:
            value = None
        if isinstance(value, dict) and len(set(value) & _DEEPSPEED_KEYS) >= 1 and "pretrained_model_name_or_path" \
                not in value:
            raise ConfigError(f"{path}: this is a DeepSpeed config, not a training config; give it with "
                              f"--deepspeed: `tunelab train CONFIG.py --deepspeed {path}`")
        if isinstance(value, list):
            raise ConfigError(f"{path}: this looks like data, not a config; set data_path = '{path}' in a config "
                              f"({_HOW})")
        raise ConfigError(f"{path}: a JSON file is not a tunelab config; {_HOW}")


def is_xtuner_config(tree: ast.Module) -> bool:
    """An XTuner/mmengine config imports from those packages; a tunelab config never does."""
    for node in tree.body:
        names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        if any(n.split(".")[0] in ("xtuner", "mmengine") for n in names):
            return True
    return False


def read_xtuner_config(tree: ast.Module) -> XTunerConfig:
    """tunelab settings from an XTuner 0.1.x config's syntax tree (see the module docstring)."""
    top: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            top[node.targets[0].id] = _value(node.value, top)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id in top:
            top[node.target.id] = _value(ast.BinOp(ast.Name(node.target.id), node.op, node.value), top)
    values: dict[str, Any] = {}
    used: set[str] = set()
    ignored: list[str] = []
    for key in SAME_NAME:
        if key in top:
            if _is_data(top[key]):
                values[key] = top[key]
                used.add(key)
            else:  # e.g. SYSTEM = SYSTEM_TEMPLATE.alpaca: a text tunelab cannot read without running XTuner
                ignored.append(f"{key} ({_code_text(top[key])})")
                used.add(key)
    if isinstance(top.get("prompt_template"), _Template):
        values["prompt_template"] = top["prompt_template"].name
        used.add("prompt_template")
    _read_model(top.get("model"), values, ignored, used)
    _read_dataset(top.get("train_dataset"), values, ignored, used)
    randomness = top.get("randomness")
    if isinstance(randomness, dict) and isinstance(randomness.get("seed"), int):
        values["seed"] = randomness["seed"]
        used.add("randomness")
    ignored += [name for name in top if name not in used]
    return XTunerConfig(values, list(values), ignored)


@dataclass(frozen=True)
class _Template:
    """PROMPT_TEMPLATE.<name>: XTuner's template names are tunelab's."""
    name: str


def _value(node: ast.AST, top: dict[str, Any]) -> Any:
    """A node's value where it is data (literals, dict(...), names set above, arithmetic); Opaque where code."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, top) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_value(k, top): _value(v, top) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Name):
        return top.get(node.id, Opaque(node.id))
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "PROMPT_TEMPLATE":
        return _Template(node.attr)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _value(kw.value, top) for kw in node.keywords if kw.arg}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        operand = _value(node.operand, top)
        return -operand if isinstance(operand, (int, float)) else Opaque(ast.unparse(node))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _value(node.left, top), _value(node.right, top)
        if _is_data(left) and _is_data(right):
            try:
                return _OPS[type(node.op)](left, right)
            except (TypeError, ZeroDivisionError):
                pass
    return Opaque(ast.unparse(node))


def _is_data(value: Any) -> bool:
    if isinstance(value, (Opaque, _Template)):
        return False
    if isinstance(value, list):
        return all(_is_data(v) for v in value)
    if isinstance(value, dict):
        return all(_is_data(v) for v in value.values())
    return True


def _code_text(value: Any) -> str:
    return value.text if isinstance(value, Opaque) else "not a plain value"


def _read_model(model: Any, values: dict, ignored: list, used: set) -> None:
    """algorithm (LoRA on a 4-bit base = qlora), LoRA r/alpha/dropout/targets, trust_remote_code."""
    if not isinstance(model, dict):
        return
    used.add("model")
    llm = model.get("llm") if isinstance(model.get("llm"), dict) else {}
    lora = model.get("lora") if isinstance(model.get("lora"), dict) else None
    quant = llm.get("quantization_config")
    four_bit = isinstance(quant, dict) and quant.get("load_in_4bit") is True
    values["algorithm"] = "full" if lora is None else "qlora" if four_bit else "lora"
    if isinstance(llm.get("trust_remote_code"), bool):
        values["trust_remote_code"] = llm["trust_remote_code"]
    if isinstance(quant, dict) and quant.get("load_in_8bit") is True:
        ignored.append("model.llm.quantization_config (8-bit: tunelab trains LoRA on 4-bit or full precision)")
    for xtuner_key, key in (("r", "lora_r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"),
                            ("target_modules", "lora_target_modules"), ("use_rslora", "use_rslora"),
                            ("use_dora", "use_dora")):
        if lora is not None and xtuner_key in lora and _is_data(lora[xtuner_key]):
            values[key] = lora[xtuner_key]


def _read_dataset(dataset: Any, values: dict, ignored: list, used: set) -> None:
    """The data files (load_dataset's data_files, or its path for a hub id) and the format its map fn reads."""
    if not isinstance(dataset, dict):
        return
    used.add("train_dataset")
    source = dataset.get("dataset") if isinstance(dataset.get("dataset"), dict) else {}
    files = source.get("data_files")
    if isinstance(files, dict):
        files = files.get("train")
    path = source.get("path")
    if isinstance(files, (str, list)) and _is_data(files):
        values["data_path"] = files
    elif isinstance(path, str) and path not in ("json", "csv", "parquet", "text"):
        values["data_path"] = path
    map_fn = dataset.get("dataset_map_fn")
    if map_fn is None:
        values["dataset_format"] = "auto"  # records already in XTuner's conversation format: detected
    elif isinstance(map_fn, Opaque) and map_fn.text in MAP_FN_FORMATS:
        values["dataset_format"] = MAP_FN_FORMATS[map_fn.text]
    else:
        ignored.append(f"train_dataset.dataset_map_fn ({_code_text(map_fn)}: the format is detected; set "
                       f"dataset_format or dataset_columns if it is not)")
