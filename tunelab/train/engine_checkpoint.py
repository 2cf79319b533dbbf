"""Checkpoint folders written by a training engine rather than by tunelab: DeepSpeed ZeRO folders (such as
XTuner's `work_dirs/<cfg>/iter_500.pth/` or tunelab's own `work_dirs/<cfg>/deepspeed/<tag>/`) and PyTorch
Distributed Checkpoint folders (FSDP's sharded format). `tunelab convert pth_to_hf` reads them like a
tunelab .pth: the weights are gathered into one state dict (DeepSpeed's own zero_to_fp32 does it for ZeRO),
then cut down to the LoRA adapter or the full model as the config's algorithm says.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from tunelab.errors import UserError

_LORA = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def is_engine_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / ".metadata").is_file() or _deepspeed_tag(path) is not None)


def _deepspeed_tag(path: Path) -> tuple[Path, str | None] | None:
    """(checkpoint dir, tag) as DeepSpeed's zero_to_fp32 wants them, or None if this is no DeepSpeed folder."""
    if list(path.glob("*model_states.pt")):
        return path.parent, path.name
    if (path / "latest").is_file():
        return path, None
    return None


def _read_dcp(path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(path), str(target))
        state = torch.load(target, map_location="cpu", weights_only=False)
    return state["model"] if isinstance(state.get("model"), dict) else state


def _read_deepspeed(path: Path) -> dict[str, torch.Tensor]:
    from tunelab.train.deepspeed_config import require_deepspeed

    require_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder, tag = _deepspeed_tag(path)
    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)


def load_engine_folder(path: str | Path, cfg) -> dict:
    """A tunelab-style checkpoint dict ({'meta', 'model', 'peft_config'}) from an engine's folder."""
    path = Path(path)
    weights = _read_dcp(path) if (path / ".metadata").is_file() else _read_deepspeed(path)
    weights = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if cfg.algorithm == "full":
        model = {re.sub(r"^(module\.|llm\.)+", "", k): v for k, v in weights.items() if not _LORA.search(k)}
        peft_config = None
    else:
        # PEFT's file layout: from 'base_model.model.', without the adapter name ('.default')
        model = {k[k.index("base_model.model."):].replace(".default.", "."): v for k, v in weights.items()
                 if _LORA.search(k) and "base_model.model." in k}
        targets = sorted({_LORA.split(k)[0].rsplit(".", 1)[-1] for k in model})
        # DoRA's magnitudes: PEFT's files name them without the module's '.weight'
        model = {re.sub(r"\.lora_magnitude_vector\.weight$", ".lora_magnitude_vector", k): v
                 for k, v in model.items()}
        peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_r,
                       "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "bias": "none",
                       "target_modules": targets, "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
                       "init_lora_weights": True if cfg.lora_init in ("default", "loftq") else cfg.lora_init}
    if not model:
        raise UserError(f"{path}: no {'LoRA adapter' if cfg.algorithm != 'full' else 'model'} weights in this "
                        f"checkpoint folder; check the config's algorithm ('{cfg.algorithm}')")
    return {"meta": {"algorithm": cfg.algorithm, "step": None}, "model": model, "peft_config": peft_config}
