"""`tunelab train --deepspeed NAME_OR_JSON`: the DeepSpeed config to run with.

NAME is one of the built-in ZeRO settings (deepspeed_zero1, deepspeed_zero2, deepspeed_zero2_offload,
deepspeed_zero3, deepspeed_zero3_offload) or a path to a DeepSpeed JSON file. The tunelab config stays the
source of truth for what the data loader and the loss depend on: micro-batch size, gradient accumulation,
clipping and precision are written into the DeepSpeed config, and where a JSON file says something else,
the config wins and a warning names both values. DeepSpeed itself is imported only when a run uses it.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import torch

from tunelab.errors import UserError

AUTO = "auto"

# Settings every built-in shares; "auto" entries are filled from the tunelab config by reconcile().
_COMMON = {
    "train_micro_batch_size_per_gpu": AUTO,
    "gradient_accumulation_steps": AUTO,
    "train_batch_size": AUTO,
    "gradient_clipping": AUTO,
    "bf16": {"enabled": AUTO},
    "fp16": {"enabled": AUTO, "initial_scale_power": 16},
    "steps_per_print": 10 ** 9,  # tunelab logs every step itself
    "wall_clock_breakdown": False,
}
_OFFLOAD = {"device": "cpu", "pin_memory": True}

BUILTIN: dict[str, dict] = {
    "deepspeed_zero1": {"zero_optimization": {"stage": 1}},
    "deepspeed_zero2": {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}},
    "deepspeed_zero2_offload": {"zero_optimization": {
        "stage": 2, "overlap_comm": True, "contiguous_gradients": True, "offload_optimizer": dict(_OFFLOAD)}},
    "deepspeed_zero3": {"zero_optimization": {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True}},
    "deepspeed_zero3_offload": {"zero_optimization": {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True, "offload_optimizer": dict(_OFFLOAD),
        "offload_param": dict(_OFFLOAD)}},
}


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def require_deepspeed() -> None:
    """UserError (one line, exit 2) when DeepSpeed cannot be imported."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("--deepspeed needs DeepSpeed, which is not installed: pip install 'tunelab[deepspeed]' "
                        "(or pip install deepspeed), or train without --deepspeed (NPROC_PER_NODE=N uses "
                        "PyTorch DDP/FSDP2)") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a broken CUDA toolkit found at import time
        raise UserError(f"--deepspeed: DeepSpeed is installed but fails to import ({type(exc).__name__}: "
                        f"{exc}); fix the installation or train without --deepspeed") from None


def load(name_or_path: str) -> dict:
    """The DeepSpeed config a --deepspeed value names (not yet reconciled with the tunelab config)."""
    if name_or_path in BUILTIN:
        return _merge(copy.deepcopy(_COMMON), copy.deepcopy(BUILTIN[name_or_path]))
    path = Path(name_or_path)
    if not path.suffix == ".json" or not path.is_file():
        from tunelab.config.schema import suggest

        hint = suggest(name_or_path, BUILTIN)
        raise UserError(f"--deepspeed '{name_or_path}': not a built-in name{hint} nor an existing .json file; "
                        f"use one of {', '.join(BUILTIN)} or a DeepSpeed JSON file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--deepspeed {path}: not valid JSON ({exc}); fix the file") from None
    if not isinstance(value, dict):
        raise UserError(f"--deepspeed {path}: expected a JSON object of DeepSpeed settings")
    stage = value.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"--deepspeed {path}: zero_optimization.stage must be 0, 1, 2 or 3, not {stage!r}")
    return value


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def reconcile(ds: dict, cfg, world_size: int, dtype: torch.dtype) -> tuple[dict, list[str]]:
    """Fill the DeepSpeed config from the tunelab config; returns (config, warnings).

    The tunelab config wins wherever the two disagree, because the data loader hands each rank
    `batch_size` sequences per micro-batch and the loss is normalised over `accumulative_counts`
    micro-batches: DeepSpeed must count the same way or its train_batch_size check fails.
    """
    ds = copy.deepcopy(ds)
    warnings: list[str] = []

    def put(key: str, value, what: str) -> None:
        given = ds.get(key, AUTO)
        if given not in (AUTO, None) and given != value:
            warnings.append(f"warning: DeepSpeed {key}={given} differs from the config's {what}; using {value}")
        ds[key] = value

    put("train_micro_batch_size_per_gpu", cfg.batch_size, f"batch_size={cfg.batch_size}")
    put("gradient_accumulation_steps", cfg.accumulative_counts, f"accumulative_counts={cfg.accumulative_counts}")
    put("train_batch_size", cfg.batch_size * cfg.accumulative_counts * world_size,
        f"batch_size x accumulative_counts x world size = {cfg.batch_size}x{cfg.accumulative_counts}x{world_size}")
    put("gradient_clipping", float(cfg.max_norm), f"max_norm={cfg.max_norm}")
    for section, wanted in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        block = ds.setdefault(section, {})
        given = block.get("enabled", AUTO)
        if given not in (AUTO, None) and bool(given) != wanted:
            warnings.append(f"warning: DeepSpeed {section}.enabled={given} differs from the config's torch_dtype "
                            f"({str(dtype).replace('torch.', '')}); using {wanted}")
        block["enabled"] = wanted
    for section in ("optimizer", "scheduler"):
        if section in ds:  # one optimizer and one schedule per run: the config's (lr, betas, warmup_ratio ...)
            warnings.append(f"warning: the DeepSpeed '{section}' section is ignored; tunelab uses AdamW with the "
                            f"config's lr, betas, weight_decay and warmup + cosine schedule")
            del ds[section]
    if offloads_optimizer(ds):
        # tunelab hands DeepSpeed its own optimizer; allow a non-DeepSpeed one should DeepSpeedCPUAdam fail to build
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds, warnings


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in ("none", None)
