"""`tunelab upload`: a trained adapter or model folder to the Hugging Face Hub, with a model card made from the run:
base model, data, template, algorithm, settings, final loss, the loss plot and how to chat with the model."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tunelab.errors import UserError

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of HF_HUB_OFFLINE
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
ALGORITHMS = {"lora": "LoRA", "qlora": "QLoRA, on a 4-bit base", "full": "full fine-tuning"}
SETTINGS = ("max_epochs", "max_steps", "lr", "batch_size", "accumulative_counts", "max_length", "pack_to_max_length",
            "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "seed")


def run_summary(folder: Path) -> dict:
    """What the folder and its training run say: tunelab.json, the config it was trained with, and from the
    newest run beside it (work_dirs/<name>/<timestamp>/) the last logged losses and the loss plot."""
    from tunelab.config.loader import load_config
    from tunelab.model.load import read_metadata

    meta = read_metadata(folder)
    trained = Path(meta.get("merged_from", {}).get("adapter", folder))
    meta = {**read_metadata(trained), **meta}
    config_file = trained / "tunelab_config.py"
    summary = {"meta": meta, "config": None, "loss": None, "val_loss": None, "step": None, "plot": None,
               "adapter": (folder / "adapter_config.json").is_file()}
    if config_file.is_file():
        try:
            summary["config"] = load_config(str(config_file))[0]
        except UserError:  # e.g. a data file since moved: the card leaves the settings out
            pass
    runs = sorted(trained.resolve().parent.glob("*/vis_data/scalars.json"))
    if runs:
        records = [json.loads(line) for line in runs[-1].read_text(encoding="utf-8").splitlines() if line.strip()]
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        if train:
            summary.update(loss=train[-1]["loss"], step=train[-1]["step"])
        if val:
            summary["val_loss"] = val[-1]["val_loss"]
        plot = runs[-1].parent.parent / "loss_curve.png"
        summary["plot"] = plot if plot.is_file() else None
    return summary


def base_model(summary: dict) -> str:
    """The base as the user named it in the config (a hub id, not the local copy it resolved to)."""
    meta, cfg = summary["meta"], summary["config"]
    if cfg is not None:
        return cfg.pretrained_model_name_or_path
    return meta.get("base_model") or meta.get("merged_from", {}).get("base", "")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def model_card(repo_id: str, summary: dict) -> str:
    """README.md for the Hub: front matter for its widgets and search, then the run in a few lines."""
    meta, cfg = summary["meta"], summary["config"]
    base = base_model(summary)
    algorithm = meta.get("algorithm") or (cfg.algorithm if cfg else "")
    kind = "LoRA adapter" if summary["adapter"] else "model"
    library = "peft" if summary["adapter"] else "transformers"
    lines = ["---", f"base_model: {base}" if is_hub_id(base) else None, f"library_name: {library}",
             f"tags: [tunelab{', ' + algorithm if algorithm else ''}]", "---", "",
             f"# {repo_id.split('/')[-1]}", "",
             f"A {kind} fine-tuned from `{base}` with tunelab"
             f"{f' ({ALGORITHMS[algorithm]})' if algorithm in ALGORITHMS else ''}.", "", "## Training", "",
             "| setting | value |", "| --- | --- |"]
    rows = [("base model", f"`{base}`"), ("algorithm", algorithm)]
    if cfg is not None:
        data = cfg.data_path if isinstance(cfg.data_path, str) else ", ".join(cfg.data_path)
        rows.append(("data", f"`{data}`"))
    rows += [("prompt template", f"`{meta.get('prompt_template', '')}`"),
             ("system text", meta.get("SYSTEM") or "(none)")]
    if cfg is not None:
        rows += [(key, f"`{getattr(cfg, key)!r}`") for key in SETTINGS
                 if cfg.algorithm != "full" or not key.startswith("lora")]
    if summary["loss"] is not None:
        rows.append(("final training loss", f"{summary['loss']:.4f} (step {summary['step']})"))
    if summary["val_loss"] is not None:
        rows.append(("final validation loss", f"{summary['val_loss']:.4f}"))
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    if summary["plot"] is not None:
        lines += ["", "![training loss and learning rate](loss_curve.png)"]
    chat = f"tunelab chat {base} --adapter model" if summary["adapter"] else "tunelab chat model"
    lines += ["", "## Chat with it", "",
              "The tokenizer carries the chat template it was trained with, and `tunelab.json` the template name "
              "and system text, so tunelab renders prompts exactly as in training:", "",
              "```bash", f"hf download {repo_id} --local-dir model", chat, "```", "",
              "Other tools: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders the same "
              "prompt; `tunelab convert gguf model model.gguf --ollama` makes a GGUF and an Ollama Modelfile.", ""]
    return "\n".join(line for line in lines if line is not None)


def upload(folder: str, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create (or reuse) the Hub repo and upload the folder with a generated model card in one commit."""
    path = Path(folder)
    if not ((path / "adapter_config.json").is_file() or (path / "config.json").is_file()):
        raise UserError(f"upload: '{folder}' holds no adapter_config.json or config.json; give an adapter or model "
                        f"folder (work_dirs/<config>/hf, or the output of `tunelab convert merge`)")
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        raise UserError("upload: HF_HUB_OFFLINE is set, and uploading needs the network; unset it and retry")
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = token or get_token()
    if not token:
        raise UserError("upload: no Hugging Face token; pass --token, set HF_TOKEN, or run `hf auth login`")
    summary = run_summary(path)
    card = model_card(repo_id, summary)
    files = [CommitOperationAdd(str(f.relative_to(path)), str(f)) for f in sorted(path.rglob("*"))
             if f.is_file() and f.name != "README.md"]
    files.append(CommitOperationAdd("README.md", card.encode("utf-8")))
    base = base_model(summary)
    if summary["adapter"] and is_hub_id(base):  # PEFT finds the base on the Hub, not at this machine's path
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        files = [f for f in files if f.path_in_repo != "adapter_config.json"]
        files.append(CommitOperationAdd("adapter_config.json", json.dumps(
            dict(config, base_model_name_or_path=base), indent=2).encode("utf-8")))
    if summary["plot"] is not None:
        files.append(CommitOperationAdd("loss_curve.png", str(summary["plot"])))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations=files, commit_message="Upload a model trained with tunelab")
    except HfHubHTTPError as exc:
        raise UserError(f"upload to '{repo_id}' failed: {str(exc).splitlines()[0]}") from None
    except OSError as exc:  # connection errors
        raise UserError(f"upload to '{repo_id}' failed: could not reach the Hub ({type(exc).__name__})") from None
    return str(url)
