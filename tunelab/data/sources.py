"""What `data_path` names, as sources: plain entries (a file, folder, hub id), mixing entries (a dict with
its own weight or count, format, system text and column names), and LLaMA-Factory dataset_info.json files
(with `dataset = NAME`: that entry's file, formatting and column map). Each source gives a list of files to
read, each with its format and column renaming; `mix` applies a source's weight or count to its samples."""
from __future__ import annotations

import difflib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.schema import Config, columns_for
from tunelab.data.loading import Record, resolve_data_files
from tunelab.errors import DataError

DOCS = "see 'Data formats' in README.md"


@dataclass
class Source:
    """One data_path entry."""
    path: str
    weight: float | None = None
    count: int | None = None
    dataset_format: str = "auto"
    system: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    dataset: str = ""

    @property
    def label(self) -> str:
        return f"{self.path} [{self.dataset}]" if self.dataset else self.path


@dataclass
class FileSpec:
    """One file to read: its format ('auto' to detect), column renaming and ShareGPT role tags."""
    file: str
    dataset_format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def sources_of(cfg: Config) -> list[Source]:
    out = []
    for entry in (cfg.data_path if isinstance(cfg.data_path, list) else [cfg.data_path]):
        if isinstance(entry, dict):
            out.append(Source(entry["path"], entry.get("weight"), entry.get("count"),
                              entry.get("dataset_format", cfg.dataset_format), entry.get("SYSTEM", ""),
                              entry.get("dataset_columns", columns_for(cfg, entry["path"])),
                              entry.get("dataset", cfg.dataset)))
        else:
            out.append(Source(entry, dataset_format=cfg.dataset_format, columns=columns_for(cfg, entry),
                              dataset=cfg.dataset))
    return out


def _dataset_info(path: str) -> Path | None:
    """The LLaMA-Factory dataset_info.json a data_path names (the file, or a folder holding one that is not a
    Hugging Face save_to_disk folder), or None."""
    p = Path(path).expanduser()
    if p.name == "dataset_info.json" and p.is_file() and not (p.parent / "state.json").exists():
        return p
    if p.is_dir() and (p / "dataset_info.json").is_file() and not (p / "state.json").exists() \
            and not (p / "dataset_dict.json").exists():
        return p / "dataset_info.json"
    return None


def files_of(source: Source) -> list[FileSpec]:
    info = _dataset_info(source.path)
    if info is None:
        return [FileSpec(f, source.dataset_format, source.columns) for f in resolve_data_files(source.path)]
    try:
        entries = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{info}: not a readable dataset_info.json ({exc}); fix the file") from None
    names = [n.strip() for n in source.dataset.split(",") if n.strip()]
    if not names:
        raise DataError(f"data_path '{source.path}' is a LLaMA-Factory dataset_info.json: set dataset = NAME to "
                        f"pick an entry (it has: {', '.join(list(entries)[:12])})")
    return [spec for name in names for spec in _entry_files(info, entries, name)]


def _entry_files(info: Path, entries: dict, name: str) -> list[FileSpec]:
    """One dataset_info.json entry as tunelab reads it: alpaca (its prompt/query/response/system/history
    columns), sharegpt (messages/system/tools columns and role tags) or, for an alpaca entry whose only
    column is `prompt` (LLaMA-Factory's pretraining entries), text."""
    if name not in entries:
        near = difflib.get_close_matches(name, list(entries), n=1)
        raise DataError(f"{info}: no dataset '{name}'" + (f" (did you mean '{near[0]}'?)" if near else "")
                        + f"; it has: {', '.join(list(entries)[:12])}")
    entry = entries[name]
    where = f"{info}: dataset '{name}'"
    if entry.get("ranking") or entry.get("formatting") not in (None, "alpaca", "sharegpt"):
        raise DataError(f"{where}: preference or {entry.get('formatting')} data; tunelab trains supervised and "
                        f"pretraining data ({DOCS})")
    if "file_name" in entry:
        file = str(info.parent / entry["file_name"])
    elif "hf_hub_url" in entry:
        file = entry["hf_hub_url"]
    else:
        raise DataError(f"{where}: no file_name or hf_hub_url; download the data and set file_name")
    cols: dict[str, str] = entry.get("columns") or {}
    if entry.get("formatting") == "sharegpt":
        fields = {"messages": "conversations", "system": "system", "tools": "tools"}
        fmt, tags = "sharegpt", entry.get("tags") or {}
    elif set(cols) == {"prompt"}:
        fields, fmt, tags = {"prompt": "text"}, "text", {}
    else:
        fields = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
        fmt, tags = "alpaca", {}
    mapping = {src: fields[key] for key, src in cols.items() if key in fields and src != fields[key]}
    return [FileSpec(f, fmt, mapping, tags) for f in resolve_data_files(file)]


# LLaMA-Factory's ShareGPT tag names -> tunelab's role names
_TAGS = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
         "function_tag": "function_call", "system_tag": "system"}


def retag(records: list[Record], tags: dict[str, str]) -> list[Record]:
    """ShareGPT records whose messages use other key and role names (dataset_info.json `tags`) rewritten with
    from/value and tunelab's roles."""
    role_key, text_key = tags.get("role_tag", "from"), tags.get("content_tag", "value")
    roles = {tags[k]: v for k, v in _TAGS.items() if k in tags}
    out = []
    for rec in records:
        value = rec.value
        if isinstance(value, dict) and isinstance(value.get("conversations"), list):
            value = {**value, "conversations": [
                {"from": roles.get(m.get(role_key), m.get(role_key)), "value": m.get(text_key)}
                if isinstance(m, dict) else m for m in value["conversations"]]}
        out.append(Record(value, rec.source, rec.line))
    return out


def mix(items: list[Any], source: Source, seed: int) -> list[Any]:
    """A source's samples as its weight or count asks: `count` samples, or `weight` times as many (2 repeats
    them twice, 0.5 takes half); whole repeats first, then a seeded random subset for the rest."""
    if not items or (source.weight is None and source.count is None):
        return items
    want = source.count if source.count is not None else round(source.weight * len(items))
    whole, rest = divmod(want, len(items))
    return items * whole + random.Random(seed).sample(items, rest)
