"""Writing a trained model as a Hugging Face/PEFT folder (the end of `tunelab train`, and `tunelab convert`):
every folder is written to a temp folder and renamed into place, and carries the tokenizer with the training
chat template plus `tunelab.json` (template and system text), so `tunelab chat` and other tools render prompts
exactly as in training."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from tunelab.config.loader import render_config
from tunelab.config.schema import Config, to_dict
from tunelab.errors import UserError
from tunelab.fsutil import atomic_dir
from tunelab.model.load import moves_base_weights, resolve_model_path, write_metadata
from tunelab.model.state import peft_config_dict, trainable_state


_SHARD = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


def check_shard_size(size: str) -> str:
    if not _SHARD.match(size.strip()):
        raise UserError(f"--max-shard-size '{size}': expected a size such as 2GB, 500MB or 10GiB")
    return size.strip()


def finish_folder(folder: Path, tokenizer, template: str, system: str, extra: dict) -> None:
    """Tokenizer with the training chat template, and tunelab.json."""
    from tunelab.config.templates import get_template, template_to_jinja

    if template != "auto":
        t = get_template(template)
        tokenizer.chat_template = template_to_jinja(dataclasses.replace(t, default_system=system or t.default_system))
    tokenizer.save_pretrained(folder)
    write_metadata(folder, prompt_template=template, SYSTEM=system, **extra)


def _write_adapter(folder: Path, weights: dict[str, torch.Tensor], peft_config: dict, base: str,
                   fp32: bool) -> None:
    """PEFT's adapter layout: adapter_config.json + adapter_model.safetensors + README.md."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = dict(peft_config, base_model_name_or_path=base, inference_mode=True)
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    LoraConfig(**{k: v for k, v in config.items() if k in known}).save_pretrained(folder)
    tensors = {k: (v.float() if fp32 else v).contiguous() for k, v in weights.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "README.md").write_text(
        f"---\nbase_model: {base}\nlibrary_name: peft\ntags: [tunelab, lora]\n---\n\n"
        f"# LoRA adapter trained with tunelab\n\nBase model: `{base}`.\n\n"
        f"```bash\ntunelab chat {base} --adapter <this folder>\n```\n", encoding="utf-8")


def original_base_adapter(weights: dict[str, torch.Tensor], peft_config: dict,
                          initial: dict[str, torch.Tensor] | None, source: str) -> tuple[dict, dict]:
    """A PiSSA/OLoRA adapter as a plain LoRA adapter of the original base (other adapters as they are).

    They train on W_res = W - s B0 A0 (B0 A0: the adapter's start); the trained model W_res + s B A is the
    original W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0], a LoRA of rank 2r with the same scale s (alpha
    doubled, or times sqrt(2) with rsLoRA). PEFT documents this conversion for save_pretrained's
    path_initial_model_for_weight_conversion; merge, chat and plain PEFT then load it on the original base."""
    if not peft_config or not moves_base_weights(str(peft_config.get("init_lora_weights"))):
        return weights, peft_config
    if initial is None:
        raise UserError(f"{source}: lora_init '{peft_config['init_lora_weights']}' moved part of the base weights "
                        f"into the adapter, and this checkpoint does not hold the adapter's start, which the export "
                        f"needs; convert a tunelab .pth checkpoint, or use the run's hf/ folder")
    converted = dict(weights)
    for key, value in weights.items():
        if ".lora_A." in key:
            converted[key] = torch.cat([value, initial[key].to(value)], dim=0)
        elif ".lora_B." in key:
            converted[key] = torch.cat([value, -initial[key].to(value)], dim=1)
    widen = 2 ** 0.5 if peft_config.get("use_rslora") else 2
    config = dict(peft_config, r=2 * peft_config["r"], lora_alpha=widen * peft_config["lora_alpha"],
                  init_lora_weights=True)
    return converted, config


def _write_full(folder: Path, weights: dict[str, torch.Tensor], base: str, fp32: bool, max_shard_size: str,
                trust_remote_code: bool) -> None:
    """A complete HF model folder from a full fine-tune's weights (built on the meta device, no copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    weights = {k: (v.float() if fp32 else v) for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size)


def export_trained(model, tokenizer, cfg: Config, target: Path, weights: dict | None = None) -> None:
    """Write the model being trained to `target` in HF/PEFT format (end of `tunelab train`); `weights`: its
    trainable state when an engine had to gather it (FSDP2, DeepSpeed ZeRO-3)."""
    base = resolve_model_path(cfg.pretrained_model_name_or_path)
    weights = weights if weights is not None else trainable_state(model, cfg.algorithm)
    write_folder(weights, peft_config_dict(model), cfg, base, target, tokenizer, fp32=False, max_shard_size="2GB",
            overwrite=True, initial=getattr(model, "tunelab_initial_adapter", None))


def write_folder(weights, peft_config, cfg: Config, base: str, target: Path, tokenizer, fp32: bool,
            max_shard_size: str, overwrite: bool = False, initial: dict | None = None, source: str = "") -> None:
    if cfg.algorithm != "full":  # before any folder is written
        weights, peft_config = original_base_adapter(weights, peft_config, initial, source or str(target))
    with atomic_dir(target, overwrite=overwrite) as tmp:
        if cfg.algorithm == "full":
            _write_full(tmp, weights, base, fp32, max_shard_size, cfg.trust_remote_code)
        else:
            _write_adapter(tmp, weights, peft_config, base, fp32)
        (tmp / "tunelab_config.py").write_text(render_config(to_dict(cfg), "trained"), encoding="utf-8")
        finish_folder(tmp, tokenizer, cfg.prompt_template, cfg.SYSTEM,
                       {"algorithm": cfg.algorithm, "base_model": base})
