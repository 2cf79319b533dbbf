"""Find and read dataset records: files (JSON array or JSON Lines whatever the extension, CSV, Parquet, plain
text), folders, `datasets` save_to_disk folders, hub datasets and tunelab's bundled data. Every record keeps its file and line for error messages."""
from __future__ import annotations

import csv
import json
import os
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunelab.errors import DataError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_DATA = {"self_cognition": ASSETS / "self_cognition_demo.jsonl",
                "preference_demo": ASSETS / "preference_demo.jsonl"}  # pairs: a helpful chosen, a rude rejected
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Record:
    """One raw record and where it came from."""
    value: Any
    source: str
    line: int | None  # 1-based line where the record starts (None when unknown, e.g. hub data)

    @property
    def where(self) -> str:
        return f"{self.source}: line {self.line}" if self.line else f"{self.source}: record"


def resolve_data_files(data_path: str) -> list[str]:
    """The files (or one hub id) a data_path names. Raises DataError when nothing is there."""
    if data_path.startswith("builtin:"):
        key = data_path.split(":", 1)[1]
        if key not in BUILTIN_DATA:
            raise DataError(f"data_path '{data_path}': no such bundled data; valid: "
                            + ", ".join(f"builtin:{k}" for k in BUILTIN_DATA))
        return [str(BUILTIN_DATA[key])]
    path = Path(os.path.expanduser(data_path))
    if path.is_file():
        return [str(path)]
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return [f"disk:{path}"]  # written by datasets' save_to_disk
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
        train = [f for f in files if "train" in Path(f).name.lower()]
        if not files:
            raise DataError(f"data_path '{data_path}': the folder holds no {'/'.join(DATA_SUFFIXES)} files")
        return train or files
    looks_local = data_path.startswith((".", "/", "~")) or path.suffix in DATA_SUFFIXES or os.sep + os.sep in data_path
    if looks_local or not _HUB_ID.match(data_path):
        raise DataError(f"data_path '{data_path}': file or folder not found; check the path "
                        f"(relative paths start from the current directory {os.getcwd()})")
    return [f"hub:{data_path}"]


def read_records(file: str) -> list[Record]:
    """All records of one file (or hub dataset), in order."""
    if file.startswith("hub:"):
        return _read_hub(file[4:])
    if file.startswith("disk:"):
        return _read_saved(file[5:])
    suffix = Path(file).suffix.lower()
    if suffix in (".csv", ".parquet"):
        return _read_tabular(file, suffix[1:])
    try:
        text = Path(file).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason}); re-save the file as UTF-8") from None
    start = len(text) - len(text.lstrip())
    if start == len(text):
        raise DataError(f"{file}: the file is empty; put records in it or remove it from data_path")
    if suffix == ".txt":  # one document per non-empty line, as datasets' text loader reads it
        return [Record({"text": line}, file, n) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if text[start] == "[" and not _json_lines_of_lists(text, start):
        return list(_iter_json_array(text, file))
    return _read_json_lines(text, file)


def _json_lines_of_lists(text: str, start: int) -> bool:
    """Whether a text that starts with '[' is JSON Lines whose lines are lists (XTuner writes OpenAI messages
    so) rather than one JSON array: its first value ends before the end of its line and more follows."""
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return False
    rest = text[end:]
    return bool(rest.strip()) and rest.lstrip(" \t\r").startswith("\n")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _decode_error(file: str, text: str, exc: json.JSONDecodeError, line_offset: int = 0) -> DataError:
    return DataError(f"{file}: line {exc.lineno + line_offset}, column {exc.colno}: invalid JSON ({exc.msg}); "
                     f"fix the syntax there")


def _iter_json_array(text: str, file: str) -> Iterator[Record]:
    """Records of a JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, text.index("[") + 1)
    if i < len(text) and text[i] == "]":
        return
    line, last = 1, 0
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise _decode_error(file, text, exc) from None
        line += text.count("\n", last, i)
        last = i
        yield Record(value, file, line)
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if _skip_ws(text, i + 1) != len(text):
                raise DataError(f"{file}: line {_line_of(text, i + 1)}: extra text after the JSON array; remove it")
            return
        where = _line_of(text, min(i, len(text) - 1))
        raise DataError(f"{file}: line {where}: invalid JSON (expected ',' or ']' between records); fix the syntax there")


def _read_json_lines(text: str, file: str) -> list[Record]:
    records = []
    for number, raw in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid inside JSON strings
        if not raw.strip():
            continue
        try:
            records.append(Record(json.loads(raw), file, number))
        except json.JSONDecodeError as exc:
            try:  # one (pretty-printed) JSON object rather than JSON Lines
                return [Record(json.loads(text), file, 1)]
            except json.JSONDecodeError:
                raise _decode_error(file, text, exc, line_offset=number - 1) from None
    return records


def read_csv_rows(path: str | Path, file: str) -> list[tuple[int, tuple[str, ...]]]:
    """(line number, cells) of every CSV row, every cell text; UTF-8, a BOM (Excel's "CSV UTF-8") tolerated."""
    csv.field_size_limit(2**31 - 1)  # long answers exceed the default 128 KiB field limit
    rows: list[tuple[int, tuple[str, ...]]] = []
    start = 1
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            for cells in reader:
                rows.append((start, tuple(cells)))
                start = reader.line_num + 1  # a quoted cell may span lines; report the line a row starts on
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason}); save it as 'CSV UTF-8'") from None
    except csv.Error as exc:
        raise DataError(f"{file}: line {start}: invalid CSV ({exc}); fix the quoting there") from None
    return rows


def _read_csv_records(file: str) -> list[Record]:
    """One record per data row, keyed by the header row. Cells stay text (a type-guessing parser would make
    '42' an int and an empty cell NaN); an empty cell is an absent field."""
    rows = [(line, cells) for line, cells in read_csv_rows(file, file) if any(c.strip() for c in cells)]
    if not rows:
        raise DataError(f"{file}: the file is empty; the first row must hold the column names")
    header = [name.strip() for name in rows[0][1]]
    records = []
    for line, cells in rows[1:]:
        if len(cells) > len(header):
            raise DataError(f"{file}: line {line}: {len(cells)} cells but {len(header)} column names; quote cells "
                            f"that hold commas")
        records.append(Record({k: v for k, v in zip(header, cells) if k and v.strip()}, file, line))
    return records


def _read_tabular(file: str, kind: str) -> list[Record]:
    if kind == "csv":
        return _read_csv_records(file)
    import datasets

    try:
        table = datasets.load_dataset(kind, data_files=file, split="train")
    except Exception as exc:  # noqa: BLE001 - report any parser failure as bad input
        raise DataError(f"{file}: could not read as {kind.upper()}: {exc}") from None
    return [Record(row, file, None) for row in table]


def _read_saved(folder: str) -> list[Record]:
    """A `datasets` save_to_disk folder: its rows (a DatasetDict's train split, else its first)."""
    import datasets

    try:
        data = datasets.load_from_disk(folder)
    except Exception as exc:  # noqa: BLE001 - any loader failure is bad input
        raise DataError(f"{folder}: could not load it as a datasets save_to_disk folder ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    return [Record(row, folder, None) for row in data]


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether a TCP connection to the Hugging Face Hub opens within `timeout` seconds, name lookup included
    (run in a thread: a lookup can hang longer than any socket timeout)."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(opened)


@contextmanager
def _offline_hub():
    """Hub libraries in offline mode (the cache only) for the block, as HF_HUB_OFFLINE=1 would set them."""
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _read_hub(repo: str) -> list[Record]:
    import datasets

    # Unreachable, the hub libraries retry for half a minute before failing: go to the cache at once instead.
    unreachable = not datasets.config.HF_HUB_OFFLINE and not hub_reachable()
    try:
        with _offline_hub() if unreachable else nullcontext():
            table = datasets.load_dataset(repo, split="train")
    except Exception as exc:  # noqa: BLE001 - offline, missing or private datasets all end here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if unreachable:
            first = "the Hugging Face Hub cannot be reached and the dataset is not in the local cache"
        raise DataError(f"data_path '{repo}': not a local file or folder, and the hub dataset could not be "
                        f"loaded ({first[:200]}); download it and set data_path to the local folder") from None
    return [Record(row, f"hub:{repo}", None) for row in table]
