"""Data preparation (`tunelab data xlsx2jsonl`, `tunelab data split`): the tutorial's custom-data story with
its real spreadsheet, CSV input, a seeded byte-preserving split, and one-line errors that leave no output."""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest

from conftest import edit_config, run_cli
from tunelab.data import prepare
from tunelab.errors import DataError

SYSTEM = ("You are a professional, highly experienced doctor professor. You always provide accurate, "
          "comprehensive, and detailed answers based on the patients' questions.")


@pytest.fixture(scope="module")
def xlsx(data_dir) -> Path:
    return data_dir / "medqa2019" / "MedQA2019.xlsx"


def _sheet_rows(xlsx: Path) -> list[tuple]:
    """The DrugQA sheet read independently of tunelab (header row excluded)."""
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.load_workbook(xlsx, read_only=True, data_only=True)
    rows = list(wb["DrugQA"].iter_rows(values_only=True))
    wb.close()
    assert rows[0][0] == "Question" and rows[0][3] == "Answer"
    return rows[1:]


def _filled(cell) -> str:
    return "" if cell is None else str(cell).strip()


def _one_line_error(cp) -> str:
    """The CLI's bad-input contract: exit code 2, one non-empty stderr line, no traceback."""
    assert cp.returncode == 2, (cp.returncode, cp.stdout, cp.stderr)
    lines = [line for line in cp.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, cp.stderr
    assert "Traceback" not in cp.stderr and lines[0].startswith("tunelab: error: ")
    return lines[0]


@pytest.mark.slow
def test_tutorial_custom_data_story(xlsx, tiny_llama, tmp_path):
    """xlsx -> conversation JSON Lines -> 7:3 split -> copy-cfg, two edits -> train: the loss falls."""
    cp = run_cli("data", "xlsx2jsonl", xlsx, "--sheet", "DrugQA", "--input-col", "A", "--output-col", "D",
                 "--system", SYSTEM, "-o", "medqa.jsonl", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    rows = _sheet_rows(xlsx)
    usable = [r for r in rows if _filled(r[0]) and _filled(r[3])]
    lines = (tmp_path / "medqa.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(usable) == 690
    assert cp.stdout.strip() == "wrote 690 records to medqa.jsonl"
    first = json.loads(lines[0])
    assert first == {"conversation": [{"system": SYSTEM,
                                       "input": "how does rivatigmine and otc sleep medicine interact",
                                       "output": rows[0][3].strip()}]}
    assert first["conversation"][0]["output"].startswith("tell your doctor and pharmacist what prescription")
    assert json.loads(lines[-1])["conversation"][0]["input"] == "is it alright to use fluticasone when using oxygen"

    cp = run_cli("data", "split", "medqa.jsonl", "--ratio", "0.7", "-o", "split", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "train.jsonl: 483 records, test.jsonl: 207 records in split"
    train = (tmp_path / "split" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    test = (tmp_path / "split" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert (len(train), len(test)) == (483, 207)
    assert sorted(train + test) == sorted(lines)

    cp = run_cli("copy-cfg", "demo", tmp_path)
    assert cp.returncode == 0, cp.stderr
    cfg = tmp_path / "demo_copy.py"
    edit_config(cfg, data_path="./split/train.jsonl", pretrained_model_name_or_path=str(tiny_llama))
    cp = run_cli("train", cfg, "--cfg-options", "max_steps=30", "log_interval=1", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "483 records -> 483 samples" in cp.stderr
    scalars = next((tmp_path / "work_dirs" / "demo_copy").glob("*/vis_data/scalars.json"))
    losses = [json.loads(line)["loss"] for line in scalars.read_text().splitlines()]
    assert len(losses) == 30
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses


@pytest.mark.slow
def test_columns_by_header_name_match_letters(xlsx, tmp_path):
    outs = []
    for cols in (["A", "D"], ["Question", "Answer"], ["a", "d"], ["question", " ANSWER "]):
        out = tmp_path / f"{'_'.join(c.strip() for c in cols)}.jsonl"
        cp = run_cli("data", "xlsx2jsonl", xlsx, "--input-col", cols[0], "--output-col", cols[1], "-o", out)
        assert cp.returncode == 0, cp.stderr
        outs.append(out.read_bytes())
    assert outs[0].count(b"\n") == 690
    assert all(o == outs[0] for o in outs[1:])
    assert b'"system"' not in outs[0]  # no --system: the key is left out
    assert b"\\u00a0" not in outs[0] and "\u00a0\"".encode() not in outs[0]  # trailing NBSPs are stripped


def test_csv_input(tmp_path):
    csv_file = tmp_path / "qa.csv"
    csv_file.write_bytes("\ufeffid,Question,Answer\n"
                         "1,  What is 2+2? , 4 \n"
                         "2,Who are you?,\n"
                         '3,你是谁,"我是小助手，\n一个模型"\n'
                         "4,Pi?,3.14\n"
                         ",,\n".encode("utf-8"))
    cp = run_cli("data", "xlsx2jsonl", csv_file, "--input-col", "Question", "--output-col", "C",
                 "--system", "Be brief.", "-o", tmp_path / "out" / "qa.jsonl")
    assert cp.returncode == 0, cp.stderr
    assert "wrote 3 records" in cp.stdout
    assert "(skipped 1 row with an empty question or answer: rows 3)" in cp.stdout
    raw = (tmp_path / "out" / "qa.jsonl").read_bytes()
    assert "你是谁".encode() in raw  # ensure_ascii=False
    records = [json.loads(line) for line in raw.decode().splitlines()]
    assert [r["conversation"][0] for r in records] == [
        {"system": "Be brief.", "input": "What is 2+2?", "output": "4"},
        {"system": "Be brief.", "input": "你是谁", "output": "我是小助手，\n一个模型"},
        {"system": "Be brief.", "input": "Pi?", "output": "3.14"},
    ]


def test_headers_that_look_like_column_letters(tmp_path):
    """An exact header wins over a letter (A is the header of column B); a letter beyond the width falls back to
    a case-insensitive header (q -> Q); otherwise a letter is a letter (a, b)."""
    src = tmp_path / "qa.csv"
    src.write_text("Q,A\nquestion,answer\n", encoding="utf-8")
    for input_col, output_col in (("Q", "A"), ("q", "B"), ("a", "b")):
        prepare.xlsx_to_jsonl(str(src), str(tmp_path / "o.jsonl"), input_col=input_col, output_col=output_col)
        record = json.loads((tmp_path / "o.jsonl").read_text(encoding="utf-8"))
        assert record == {"conversation": [{"input": "question", "output": "answer"}]}, (input_col, output_col)


def test_line_separator_characters_stay_inside_one_record(tmp_path):
    """U+2028 in a cell must not break the JSON Lines output for a reader that splits with str.splitlines."""
    from tunelab.data.loading import read_records

    (tmp_path / "a.csv").write_text("q,a\nline\u2028sep,next\u0085line\nq2,a\u2029b\n", encoding="utf-8")
    prepare.xlsx_to_jsonl(str(tmp_path / "a.csv"), str(tmp_path / "a.jsonl"), input_col="A", output_col="B")
    assert len((tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert [r.value["conversation"][0] for r in read_records(str(tmp_path / "a.jsonl"))] == [
        {"input": "line\u2028sep", "output": "next\u0085line"}, {"input": "q2", "output": "a\u2029b"}]


def _jsonl_fixture(path: Path, n: int = 20) -> list[bytes]:
    """JSON Lines whose formatting json.dumps would not reproduce (spacing, key order, escapes, CRLF)."""
    lines = [f'{{"b": {i},   "a":"r\\u00e9ponse {i}", "z": [1,2 ,3]}}'.encode() if i % 2 else
             f'{{"conversation":[{{"input":"问题{i}","output":"答{i}"}}]}}  '.encode() for i in range(n)]
    path.write_bytes(b"\r\n".join(lines[:5]) + b"\r\n\n" + b"\n".join(lines[5:]))  # a blank line, no final newline
    return lines


def test_split_is_seeded_complete_and_byte_preserving(tmp_path):
    src = tmp_path / "data.jsonl"
    original = _jsonl_fixture(src)
    a, b, c = (tmp_path / d for d in ("a", "b", "c"))
    assert prepare.split_file(str(src), str(a), ratio=0.7, seed=3) == \
        f"train.jsonl: 14 records, test.jsonl: 6 records in {a}"
    prepare.split_file(str(src), str(b), ratio=0.7, seed=3)
    prepare.split_file(str(src), str(c), ratio=0.7, seed=4)
    files = {d: ((d / "train.jsonl").read_bytes(), (d / "test.jsonl").read_bytes()) for d in (a, b, c)}
    assert files[a] == files[b]
    assert files[a] != files[c]
    for train, test in files.values():
        parts = train.split(b"\n")[:-1] + test.split(b"\n")[:-1]
        assert train.endswith(b"\n") and test.endswith(b"\n")
        assert (train.count(b"\n"), test.count(b"\n")) == (14, 6)
        assert collections.Counter(parts) == collections.Counter(original)  # each line once, byte for byte
    # the shuffle really shuffles, and the CLI's default seed is 0
    assert files[a][0].split(b"\n")[:14] != original[:14]
    cp = run_cli("data", "split", src, "-o", tmp_path / "cli")
    assert cp.returncode == 0, cp.stderr
    prepare.split_file(str(src), str(tmp_path / "seed0"), ratio=0.7, seed=0)
    assert (tmp_path / "cli" / "train.jsonl").read_bytes() == (tmp_path / "seed0" / "train.jsonl").read_bytes()


def test_split_pretty_printed_json_array(data_dir, tmp_path):
    src = data_dir / "medqa2019" / "MedQA2019-structured-test.jsonl"
    summary = prepare.split_file(str(src), str(tmp_path), ratio=0.7, seed=0)
    assert summary == f"train.jsonl: 146 records, test.jsonl: 62 records in {tmp_path}"
    expected = json.loads(src.read_text(encoding="utf-8"))
    got = [json.loads(line) for name in ("train.jsonl", "test.jsonl")
           for line in (tmp_path / name).read_text(encoding="utf-8").splitlines()]
    canon = lambda v: json.dumps(v, sort_keys=True)  # noqa: E731
    assert len(expected) == 208
    assert collections.Counter(map(canon, got)) == collections.Counter(map(canon, expected))


def test_split_writes_both_files_or_none(tmp_path, monkeypatch):
    src = tmp_path / "data.jsonl"
    _jsonl_fixture(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("old train\n")
    real_fdopen, calls = prepare.os.fdopen, []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_fdopen(*args, **kwargs)

    monkeypatch.setattr(prepare.os, "fdopen", failing_second)
    with pytest.raises(OSError):
        prepare.split_file(str(src), str(out), ratio=0.5)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]  # no temp files, no test.jsonl
    assert (out / "train.jsonl").read_text() == "old train\n"


def test_missing_openpyxl_is_a_clear_error(xlsx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # makes `import openpyxl` raise ImportError
    with pytest.raises(DataError, match="pip install openpyxl"):
        prepare.xlsx_to_jsonl(str(xlsx), str(tmp_path / "o.jsonl"), input_col="A", output_col="D")
    assert not list(tmp_path.iterdir())


def _bad_csv(tmp_path: Path) -> Path:
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nhi,hello\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("case", ["sheet", "letter", "header", "csv_column", "ratio", "missing_xlsx",
                                  "missing_split", "csv_letter", "extension"])
def test_bad_input_is_one_line_and_leaves_no_output(case, xlsx, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "out.jsonl").write_text("previous output\n")  # a failed run must not touch an earlier result
    convert = ["data", "xlsx2jsonl"]
    args, expected = {
        "sheet": (convert + [xlsx, "--sheet", "Drugs", "--input-col", "A", "--output-col", "D"],
                  [str(xlsx), "no sheet 'Drugs'", "'DrugQA'", "--sheet"]),
        "letter": (convert + [xlsx, "--input-col", "A", "--output-col", "H"],
                   [str(xlsx), "sheet 'DrugQA'", "--output-col H", "beyond the sheet's 6 columns", "D 'Answer'"]),
        "header": (convert + [xlsx, "--input-col", "Questions", "--output-col", "Answer"],
                   [str(xlsx), "--input-col 'Questions'", "no such column header", "A 'Question'"]),
        "csv_column": (convert + [_bad_csv(tmp_path), "--input-col", "question", "--output-col", "response"],
                       [str(tmp_path / "qa.csv"), "'response'", "A 'question', B 'answer'"]),
        "ratio": (["data", "split", _bad_csv(tmp_path), "--ratio", "1.5", "-o", "split"],
                  ["--ratio 1.5", "between 0 and 1", "qa.csv"]),
        "missing_xlsx": (convert + ["nope.xlsx", "--input-col", "A", "--output-col", "D"],
                         ["nope.xlsx: file not found", "check the path"]),
        "missing_split": (["data", "split", "nope.jsonl", "-o", "split"], ["nope.jsonl: file not found"]),
        "csv_letter": (convert + [_bad_csv(tmp_path), "--input-col", "A", "--output-col", "C"],
                       ["qa.csv: --output-col C: column C is beyond the sheet's 2 columns (A-B)"]),
        "extension": (convert + [tmp_path / "qa.xls", "--input-col", "A", "--output-col", "B"], [".xls"]),
    }[case]
    if case == "extension":
        (tmp_path / "qa.xls").write_bytes(b"\xd0\xcf\x11\xe0")
    if args[1] == "xlsx2jsonl":
        args += ["-o", "out.jsonl"]
    cp = run_cli(*args, cwd=work)
    message = _one_line_error(cp)
    for text in expected:
        assert text in message, message
    assert sorted(p.name for p in work.iterdir()) == ["out.jsonl"]
    assert (work / "out.jsonl").read_text() == "previous output\n"


def test_rows_without_answers_anywhere_is_an_error(tmp_path):
    src = tmp_path / "q.csv"
    src.write_text("Question,Answer\nonly a question,\n, only an answer\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"q\.csv: no row has both a question \(column A\) and an answer"):
        prepare.xlsx_to_jsonl(str(src), str(tmp_path / "o.jsonl"), input_col="Question", output_col="Answer")
    (tmp_path / "two.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    with pytest.raises(DataError, match=r"2 records with --ratio 0.9 would leave test.jsonl empty"):
        prepare.split_file(str(tmp_path / "two.jsonl"), str(tmp_path / "s"), ratio=0.9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.csv", "two.jsonl"]
