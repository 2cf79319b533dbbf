"""Dataset preparation for the tutorial's custom-data story: spreadsheet rows -> conversation JSON Lines
(`tunelab data xlsx2jsonl`) and a seeded train/test split (`tunelab data split`).

Every bad input raises DataError with one line naming the file (sheet, column, line) and the fix. Outputs
are written to a temporary file beside the target and moved into place, so a failure leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

from tunelab.data.loading import read_csv_rows, read_records
from tunelab.errors import DataError
from tunelab.fsutil import temp_file_beside

_LETTERS = re.compile(r"^[A-Za-z]{1,3}$")
# Characters str.splitlines() breaks on that json.dumps(ensure_ascii=False) leaves raw: escape them so every
# record stays on one line for any JSON Lines reader (tunelab's own splits with str.splitlines()).
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def xlsx_to_jsonl(file: str, output: str, *, input_col: str, output_col: str, sheet: str | None = None,
                  system: str = "") -> str:
    """Turn spreadsheet rows (.xlsx or .csv) into conversation-format JSON Lines.

    The first row is always the header row. Columns are given by letter (A, D, AA; any case) or by header
    text (an exact header match wins over a letter; otherwise a case-insensitive match). Each row with a
    non-empty question and answer becomes `{"conversation": [{"system": ..., "input": Q, "output": A}]}`
    ("system" left out when empty); other rows that are not wholly blank are skipped and counted.
    Returns a one-line summary.
    """
    path = _existing_file(file)
    _check_output_file(output, path)
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        rows, where = _read_xlsx(path, file, sheet)
    elif suffix == ".csv":
        if sheet is not None:
            raise DataError(f"{file}: --sheet applies to .xlsx files only; a CSV file has one table, drop --sheet")
        rows, where = read_csv_rows(path, file), file
    else:
        raise DataError(f"{file}: unsupported file type '{suffix or '(none)'}'; give an .xlsx or .csv file "
                        f"(save other spreadsheets as .xlsx or CSV UTF-8 first)")
    if not any(_text(c) for _, cells in rows for c in cells):
        raise DataError(f"{where}: the sheet is empty; the first row must hold the headers and the rest the data")
    header = [_text(c) for c in rows[0][1]]
    width = max(len(cells) for _, cells in rows)
    q_i = _column_index(input_col, header, width, where, "--input-col")
    a_i = _column_index(output_col, header, width, where, "--output-col")

    system = (system or "").strip()
    lines, skipped = [], []
    for number, cells in rows[1:]:
        texts = [_text(c) for c in cells]
        if not any(texts):
            continue  # wholly blank rows (trailing formatted rows in Excel) are not data
        q = texts[q_i] if q_i < len(texts) else ""
        a = texts[a_i] if a_i < len(texts) else ""
        if not q or not a:
            skipped.append(number)
            continue
        turn = ({"system": system} if system else {}) | {"input": q, "output": a}
        lines.append(_json_line({"conversation": [turn]}))
    if not lines:
        raise DataError(f"{where}: no row has both a question (column {_letter(q_i)}) and an answer (column "
                        f"{_letter(a_i)}); check --input-col and --output-col")
    _write_atomic([(Path(output), lines)])
    summary = f"wrote {len(lines)} records to {output}"
    if skipped:
        shown = "rows " + ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        summary += (f" (skipped {len(skipped)} row{'s' if len(skipped) > 1 else ''} with an empty question or "
                    f"answer: {shown})")
    return summary


def split_file(file: str, output_dir: str, *, ratio: float = 0.7, seed: int = 0) -> str:
    """Shuffle a file's records with random.Random(seed) and write round(n * ratio) of them to
    OUTPUT_DIR/train.jsonl and the rest to OUTPUT_DIR/test.jsonl (JSON Lines; both files or neither).

    JSON Lines input lines are copied byte for byte; records of a JSON array (or CSV/Parquet rows) are written
    with json.dumps. Returns a one-line summary.
    """
    if not 0 < ratio < 1:
        raise DataError(f"--ratio {ratio}: must be between 0 and 1 (exclusive), e.g. 0.7 puts 70% of {file} "
                        f"in train.jsonl")
    path = _existing_file(file)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"-o {output_dir}: exists and is not a folder; give a folder for train.jsonl and test.jsonl")
    targets = [out / "train.jsonl", out / "test.jsonl"]
    for target in targets:
        if target.is_dir():
            raise DataError(f"{target}: is a folder; remove it or choose another -o folder")
        if target.exists() and target.resolve() == path.resolve():
            raise DataError(f"{file}: -o {output_dir} would overwrite the input with {target.name}; "
                            f"choose another -o folder")

    if path.stat().st_size == 0:
        raise DataError(f"{file}: the file is empty; nothing to split")
    # "hub:" is read_records' marker for hub datasets; a local file of that name must not look like one
    records = read_records(str(path) if not str(path).startswith("hub:") else os.path.join(".", str(path)))
    text = "" if path.suffix.lower() in (".csv", ".parquet") else path.read_bytes().decode("utf-8-sig")
    if text and not text.lstrip().startswith("["):
        # JSON Lines: read_records numbers lines as str.splitlines() does (universal newlines give the same
        # breaks), so the same split of the undecoded text gives each record's original line
        originals = text.splitlines()
        lines = [originals[r.line - 1] for r in records]
    else:  # a JSON array, CSV or Parquet: one json.dumps line per record
        lines = [_json_line(r.value) for r in records]

    n = len(lines)
    n_train = round(n * ratio)
    if n_train == 0 or n_train == n:
        empty = "train.jsonl" if n_train == 0 else "test.jsonl"
        raise DataError(f"{file}: {n} record{'s' if n != 1 else ''} with --ratio {ratio} would leave {empty} "
                        f"empty; add records or choose a ratio nearer 0.5")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts = [[lines[i] for i in order[:n_train]], [lines[i] for i in order[n_train:]]]
    _write_atomic(list(zip(targets, parts)))
    return f"train.jsonl: {n_train} records, test.jsonl: {n - n_train} records in {output_dir}"


def _existing_file(file: str) -> Path:
    path = Path(os.path.expanduser(file))
    if path.is_dir():
        raise DataError(f"{file}: is a folder; give the data file itself")
    if not path.is_file():
        raise DataError(f"{file}: file not found; check the path (relative paths start from {os.getcwd()})")
    return path


def _read_xlsx(path: Path, file: str, sheet: str | None) -> tuple[list[tuple[int, tuple]], str]:
    """(row number, cells) of every row of the sheet, and the sheet's name for messages."""
    try:
        import openpyxl  # optional dependency: only this command needs it
    except ImportError:
        raise DataError(f"{file}: reading .xlsx needs openpyxl; pip install openpyxl "
                        f"(or save the sheet as CSV UTF-8 and pass the .csv)") from None
    try:
        # data_only: a formula cell gives the value Excel last computed, not the formula text
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, XML and format errors all mean "not a readable .xlsx"
        raise DataError(f"{file}: not a readable .xlsx workbook ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); re-save it as .xlsx") from None
    try:
        names = wb.sheetnames
        if sheet is None:
            name = names[0]
        else:
            folded = [n for n in names if n.strip().lower() == sheet.strip().lower()]
            name = sheet if sheet in names else folded[0] if len(folded) == 1 else None
            if name is None:
                raise DataError(f"{file}: no sheet {sheet!r}; the workbook has sheets "
                                f"{', '.join(map(repr, names))}; pass one of them with --sheet")
        ws = wb[name]
        ws.reset_dimensions()  # the stored size can be wrong in files other programs wrote; read what is there
        rows = [(i, tuple(r)) for i, r in enumerate(ws.iter_rows(values_only=True), start=1)]
    finally:
        wb.close()
    return rows, f"{file}: sheet {name!r}"


def _text(cell: Any) -> str:
    return "" if cell is None else (cell if isinstance(cell, str) else str(cell)).strip()


def _letter(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return letters


def _column_index(spec: str, header: list[str], width: int, where: str, flag: str) -> int:
    """0-based index of the column a --input-col/--output-col names: an exact header, a letter, or a
    case-insensitive header, in that order (so a header named e.g. 'Q' still works)."""
    want = spec.strip()
    exact = [i for i, h in enumerate(header) if h == want]
    folded = [i for i, h in enumerate(header) if h.lower() == want.lower()]
    for hits in (exact, folded if not _LETTERS.match(want) else []):
        if len(hits) > 1:
            raise DataError(f"{where}: {flag} {spec!r} matches the headers of columns "
                            f"{', '.join(_letter(i) for i in hits)}; give the column letter instead")
        if hits:
            return hits[0]
    listing = ", ".join(f"{_letter(i)} {h!r}" for i, h in enumerate(header) if h) or "(no headers)"
    if _LETTERS.match(want):
        index = 0
        for ch in want.upper():
            index = index * 26 + ord(ch) - ord("A") + 1
        if index <= width:
            return index - 1
        if len(folded) == 1:  # 'id' for a header 'ID' (as a letter, column 238: beyond the width)
            return folded[0]
        raise DataError(f"{where}: {flag} {spec}: column {want.upper()} is beyond the sheet's {width} columns "
                        f"(A-{_letter(width - 1)}); the header row has {listing}")
    raise DataError(f"{where}: {flag} {spec!r}: no such column header; the header row has {listing}; "
                    f"give one of these or a column letter")


def _json_line(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    for raw, escaped in _LINE_BREAKS.items():
        text = text.replace(raw, escaped)  # these can only occur inside JSON strings, where the escape is valid
    return text


def _check_output_file(output: str, source: Path) -> None:
    target = Path(output)
    if target.is_dir():
        raise DataError(f"-o {output}: is a folder; give a file name such as {Path(output) / 'data.jsonl'}")
    if target.exists() and target.resolve() == source.resolve():
        raise DataError(f"-o {output}: is the input file; give another output name")


def _write_atomic(items: list[tuple[Path, list[str]]]) -> None:
    """Write one or more files so that either all of them are replaced or none is: each goes to a temporary
    file beside its target (same filesystem, so os.replace is an atomic rename) and is moved only when all
    are complete. The renames only fail in cases checked beforehand (a folder in the way)."""
    temps: list[str] = []
    try:
        for target, lines in items:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = temp_file_beside(target)
            temps.append(tmp)
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.writelines(line + "\n" for line in lines)
    except BaseException:
        for tmp in temps:
            os.unlink(tmp)
        raise
    for tmp, (target, _) in zip(temps, items):
        os.replace(tmp, target)
