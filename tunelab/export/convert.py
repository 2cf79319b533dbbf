"""`tunelab convert`: training checkpoints to Hugging Face/PEFT folders, adapter merging, re-sharding; each
output written as tunelab.model.save writes the end of a training run (whole or not at all, with the training
chat template)."""
from __future__ import annotations

from pathlib import Path

import torch

from tunelab.train.checkpoint import load_checkpoint
from tunelab.fsutil import atomic_dir
from tunelab.config.schema import Config
from tunelab.errors import UserError
from tunelab.model.save import check_shard_size, finish_folder, write_folder
from tunelab.model.load import (check_adapter_fits, load_model, load_tokenizer, read_metadata,
                                resolve_model_path, write_metadata)

def pth_to_hf(cfg: Config, pth: str, save_dir: str, fp32: bool = False, max_shard_size: str = "2GB") -> None:
    """A training checkpoint to a PEFT adapter folder (LoRA/QLoRA) or a full HF model (full tuning). `pth` is
    a tunelab .pth (from any number of processes or engine) or an engine's folder (DeepSpeed ZeRO, DCP)."""
    from tunelab.train.engine_checkpoint import is_engine_folder, load_engine_folder

    max_shard_size = check_shard_size(max_shard_size)
    state = load_engine_folder(pth, cfg) if is_engine_folder(pth) else load_checkpoint(pth)
    algorithm = state["meta"]["algorithm"]
    if algorithm != cfg.algorithm:
        raise UserError(f"{pth}: the checkpoint is from a '{algorithm}' run but the config says algorithm = "
                        f"'{cfg.algorithm}'; pass the config the checkpoint was trained with")
    base = resolve_model_path(cfg.pretrained_model_name_or_path)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code)
    write_folder(state["model"], state.get("peft_config"), cfg, base, Path(save_dir), tokenizer, fp32, max_shard_size,
            initial=state.get("initial_adapter"), source=pth)


def merge(base: str, adapter: str, save_dir: str, max_shard_size: str = "2GB", device: str = "cpu",
          trust_remote_code: bool = False) -> None:
    """Fold a LoRA adapter into its base: a standalone HF model folder with tokenizer and chat template."""
    max_shard_size = check_shard_size(max_shard_size)
    merged, tokenizer, meta, base_path, adapter_path = load_merged(base, adapter, device, trust_remote_code)
    with atomic_dir(save_dir) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        finish_folder(tmp, tokenizer, meta.get("prompt_template", "auto"), meta.get("SYSTEM", ""),
                       {"merged_from": {"base": base_path, "adapter": str(adapter_path.resolve())}})


def load_merged(base: str, adapter: str, device: str = "cpu", trust_remote_code: bool = False):
    """(merged model, tokenizer, tunelab.json of the adapter, base path, adapter path): a LoRA adapter folded
    into its base in memory."""
    from peft import PeftModel

    base_path = resolve_model_path(base, "BASE")
    adapter_path = Path(adapter)
    if not (adapter_path / "adapter_config.json").is_file():
        raise UserError(f"ADAPTER '{adapter}': no adapter_config.json there; give the folder written by "
                        f"`tunelab convert pth_to_hf` (or work_dirs/<config>/hf)")
    check_adapter_fits(base_path, adapter_path, trust_remote_code)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(base_path, dtype="auto", device=device, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
    tok_src = adapter_path if (adapter_path / "tokenizer_config.json").is_file() else Path(base_path)
    tokenizer = load_tokenizer(str(tok_src), trust_remote_code)
    return merged, tokenizer, read_metadata(adapter_path), base_path, adapter_path


def split(src: str, dst: str, max_shard_size: str = "2GB", trust_remote_code: bool = False) -> None:
    """Re-shard a Hugging Face model folder into files of at most max_shard_size."""
    max_shard_size = check_shard_size(max_shard_size)
    src_path = resolve_model_path(src, "SRC")
    model = load_model(src_path, dtype="auto", device="cpu", trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(src_path, trust_remote_code)
    with atomic_dir(dst) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        meta = read_metadata(src_path)
        if meta:
            write_metadata(tmp, **meta)
