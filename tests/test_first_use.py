"""What a new user runs into first: wrong kinds of path, foreign files, work dirs that hold a run, file modes,
empty CSV cells and the hints the messages give. Each story runs the real CLI in a subprocess."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from conftest import run_cli, write_config


def _one_error_line(cp, code: int = 2) -> str:
    assert cp.returncode == code, (cp.returncode, cp.stderr[-2000:])
    lines = [line for line in cp.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, cp.stderr
    assert "Traceback" not in cp.stderr
    return lines[0]


# -- list-cfg ------------------------------------------------------------------------------------------
def test_list_cfg_without_a_match_says_so_and_exits_1():
    cp = run_cli("list-cfg", "-p", "nomatch")
    assert cp.stdout == ""
    line = _one_error_line(cp, code=1)
    assert "no built-in config matches 'nomatch'" in line and "tunelab list-cfg" in line


# -- data files follow the umask -------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_data_commands_write_files_with_the_umask_mode(tmp_path, umask):
    source = tmp_path / "qa.csv"
    source.write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(6)), encoding="utf-8")
    old = os.umask(umask)  # the subprocess inherits it
    try:
        assert run_cli("data", "xlsx2jsonl", source, "--input-col", "A", "--output-col", "B",
                       "-o", tmp_path / "qa.jsonl").returncode == 0
        assert run_cli("data", "split", tmp_path / "qa.jsonl", "-o", tmp_path / "split").returncode == 0
    finally:
        os.umask(old)
    for written in (tmp_path / "qa.jsonl", tmp_path / "split" / "train.jsonl", tmp_path / "split" / "test.jsonl"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written


# -- interactive chat -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_interactive_chat_starts_with_a_hint_about_reset_and_exit(tiny_llama):
    """On a terminal (a pty here) chat says how to clear and quit before the first prompt."""
    import pty
    import select
    import subprocess
    import sys
    import time

    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "chat", str(tiny_llama), "--max-new-tokens", "2"],
                            stdin=child, stdout=child, stderr=child, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    os.close(child)
    seen, deadline = b"", time.monotonic() + 120
    try:
        while b">>> " not in seen and time.monotonic() < deadline and proc.poll() is None:
            if select.select([main], [], [], 0.5)[0]:
                seen += os.read(main, 4096)
        os.write(main, b"EXIT\n")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    text = seen.decode("utf-8", "replace")
    hint = text[:text.index(">>> ")]
    assert "RESET" in hint and "EXIT" in hint, text


# -- a short run: checkpoint name, memory on the progress line, a work dir that holds a run -----------------
def _short_config(path: Path, model: Path, data_dir: Path, **over) -> Path:
    values = dict(pretrained_model_name_or_path=str(model), algorithm="lora", lora_r=4, lora_alpha=8,
                  data_path=str(data_dir / "alpaca" / "alpaca_data_first102.json"), max_length=128,
                  pack_to_max_length=False, accumulative_counts=1, max_steps=2, log_interval=1,
                  gradient_checkpointing=False)
    return write_config(path, **dict(values, **over))


@pytest.fixture(scope="module")
def short_run(tiny_llama, data_dir, tmp_path_factory):
    """`tunelab train` stopped by max_steps=2 in the middle of its first epoch (about 100 steps)."""
    root = tmp_path_factory.mktemp("short_run")
    cfg = _short_config(root / "short.py", tiny_llama, data_dir)
    cp = run_cli("train", cfg, "--work-dir", root / "work", cwd=root)
    assert cp.returncode == 0, cp.stderr[-3000:]
    return root / "work", cfg, cp


@pytest.mark.slow
def test_max_steps_stop_mid_epoch_names_the_checkpoint_by_its_step(short_run):
    work, _, _ = short_run
    assert sorted(p.name for p in work.glob("*.pth")) == ["iter_2.pth"]
    assert Path((work / "last_checkpoint").read_text()).name == "iter_2.pth"


@pytest.mark.slow
def test_progress_line_shows_resident_memory_on_a_cpu(short_run):
    work, _, cp = short_run
    shown = [float(part.split()[1]) for line in cp.stderr.splitlines() for part in line.split(" | ")
             if part.startswith("mem ")]
    assert shown and all(value >= 0.05 for value in shown), cp.stderr[-2000:]  # torch alone is > 50 MiB
    logged = [json.loads(line) for line in next(work.glob("*/vis_data/scalars.json")).read_text().splitlines()]
    assert all(rec["memory_gb"] >= 0.05 for rec in logged if "memory_gb" in rec)


@pytest.mark.slow
def test_training_into_a_work_dir_that_holds_a_run_is_refused(short_run):
    """Without --resume a second run would overwrite hf/ and leave its checkpoints beside the first run's."""
    work, cfg, _ = short_run
    before = {p.name: p.stat().st_mtime_ns for p in work.rglob("*")}
    line = _one_error_line(run_cli("train", cfg, "--work-dir", work, "--cfg-options", "max_steps=3",
                                   cwd=cfg.parent))
    assert str(work) in line and "iter_2.pth" in line and "--resume" in line and "--work-dir" in line
    assert {p.name: p.stat().st_mtime_ns for p in work.rglob("*")} == before


# -- wrong kinds of path ----------------------------------------------------------------------------------
@pytest.fixture()
def good_config(tiny_llama, data_dir, tmp_path) -> Path:
    return write_config(tmp_path / "c.py", pretrained_model_name_or_path=str(tiny_llama), algorithm="lora",
                        data_path=str(data_dir / "self_cognition" / "personal_assistant.json"))


def test_chat_on_a_checkpoint_points_at_pth_to_hf(tmp_path):
    pth = tmp_path / "work_dirs" / "x" / "epoch_1.pth"
    pth.parent.mkdir(parents=True)
    pth.write_bytes(b"\x80\x02}q\x00.")
    line = _one_error_line(run_cli("chat", pth))
    assert "training checkpoint" in line and "convert pth_to_hf" in line and "download" not in line


def test_chat_on_some_other_file_says_it_is_a_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    line = _one_error_line(run_cli("chat", notes))
    assert "is a file, not a model folder" in line and "config.json" in line


@pytest.mark.slow
def test_a_folder_where_a_checkpoint_belongs_is_named_a_folder(good_config, tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "iter_5.pth").write_bytes(b"")
    line = _one_error_line(run_cli("convert", "pth_to_hf", good_config, folder, tmp_path / "out"))
    assert "is a folder, not a checkpoint file" in line and "iter_5.pth" in line and "not found" not in line
    line = _one_error_line(run_cli("train", good_config, "--resume", folder, cwd=tmp_path))
    assert "is a folder, not a checkpoint file" in line
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_checkpoint_is_named_so(good_config, tmp_path):
    other = tmp_path / "adapter_config.json"
    other.write_text(json.dumps({"r": 8}))
    line = _one_error_line(run_cli("convert", "pth_to_hf", good_config, other, tmp_path / "out"))
    assert "not a readable tunelab checkpoint" in line and "`tunelab train` writes" in line


# -- CSV cells are text ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_csv_cells_are_text_and_an_empty_cell_is_an_absent_field(tiny_llama, tmp_path):
    """Number-like answers and a `system` column empty in some rows load as text; before, the CSV parser
    typed the cells (answers became ints, empty cells nulls or NaN floats)."""
    data = tmp_path / "qa.csv"
    data.write_text('query,response,system\nwhat is six times seven,42,\n'
                    '"in what year did Apollo 11 land on the moon, and where",1969,Answer briefly.\n'
                    '\nhow many legs has a cat,4,\n', encoding="utf-8")
    cfg = write_config(tmp_path / "c.py", pretrained_model_name_or_path=str(tiny_llama), data_path=str(data),
                       prompt_template="internlm_chat")
    cp = run_cli("check-custom-dataset", cfg, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert "3 records" in cp.stdout and "query_response" in cp.stdout, cp.stdout
    from tunelab.data.loading import read_records

    records = read_records(str(data))
    assert [r.value for r in records] == [
        {"query": "what is six times seven", "response": "42"},
        {"query": "in what year did Apollo 11 land on the moon, and where", "response": "1969",
         "system": "Answer briefly."},
        {"query": "how many legs has a cat", "response": "4"}]
    assert [r.line for r in records] == [2, 3, 5]


# -- messages point at what the user has --------------------------------------------------------------------
def test_no_message_points_at_documents_the_user_does_not_have():
    from conftest import ROOT

    for source in sorted((ROOT / "tunelab").rglob("*.py")):
        text = source.read_text(encoding="utf-8")
        assert "SPEC" not in text, f"{source} mentions SPEC, a document users do not have"


@pytest.mark.slow
def test_keys_near_a_format_get_the_exact_dataset_columns_mapping(tiny_llama, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "input": "", "answer": w}) + "\n"
                            for w in ("yes", "no")), encoding="utf-8")
    cfg = write_config(tmp_path / "c.py", pretrained_model_name_or_path=str(tiny_llama), data_path=str(data))
    line = _one_error_line(run_cli("check-custom-dataset", cfg, cwd=tmp_path))
    assert f"{data}: line 1: unrecognised record format" in line
    assert "dataset_columns = {'answer': 'output'}" in line and "alpaca" in line
    cp = run_cli("check-custom-dataset", cfg, "--cfg-options", "dataset_columns={'answer': 'output'}", cwd=tmp_path)
    assert cp.returncode == 0 and "format alpaca, 2 records" in cp.stdout, cp.stderr[-2000:]


@pytest.mark.slow
def test_a_bad_cfg_option_blames_the_command_line_not_the_file(good_config, tmp_path):
    line = _one_error_line(run_cli("train", good_config, "--cfg-options", "lr=fast", cwd=tmp_path))
    assert line == "tunelab: error: --cfg-options: 'lr' must be a number, got 'fast'"
    line = _one_error_line(run_cli("train", good_config, "--cfg-options", "max_lenght=512", cwd=tmp_path))
    assert line.startswith("tunelab: error: --cfg-options: unknown config key 'max_lenght'")


# -- an unedited hub dataset id, offline ----------------------------------------------------------------------
@pytest.mark.slow
def test_unreachable_hub_dataset_fails_at_once(tiny_llama, tmp_path, monkeypatch):
    """No offline variables set and the Hub unreachable (a closed local port stands in for it): the clear line
    comes within 2 s of a local failure that does the same work, not after half a minute of retries."""
    import time

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")

    def timed(data_path: str):
        cfg = write_config(tmp_path / "c.py", pretrained_model_name_or_path=str(tiny_llama), data_path=data_path)
        start = time.monotonic()
        cp = run_cli("check-custom-dataset", cfg, cwd=tmp_path)
        return cp, time.monotonic() - start

    cp, local = timed(str(broken))  # imports datasets and loads the tokenizer too
    assert cp.returncode == 2, cp.stderr
    cp, hub = timed("timdettmers/openassistant-guanaco")
    line = _one_error_line(cp)
    assert "data_path 'timdettmers/openassistant-guanaco': not a local file or folder" in line
    assert "cannot be reached" in line and "download it and set data_path to the local folder" in line
    assert hub < local + 2.0, (hub, local)


# -- an adapter on the wrong base model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def narrower_llama(tmp_path_factory) -> Path:
    """Another base model: the same architecture at hidden size 64."""
    from tunelab.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("narrow") / "narrow-llama", "llama", hidden_size=64)


@pytest.mark.slow
def test_merge_onto_the_wrong_base_is_one_line_naming_both_models(tiny_llama_adapter, narrower_llama, tiny_llama,
                                                                  tmp_path):
    out = tmp_path / "merged"
    line = _one_error_line(run_cli("convert", "merge", narrower_llama, tiny_llama_adapter, out))
    assert f"was trained on '{tiny_llama}'" in line and f"base model '{narrower_llama}'" in line
    assert "q_proj has 64 inputs in the base, 128 in the adapter" in line
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    cp = run_cli("convert", "merge", tiny_llama, tiny_llama_adapter, out)  # the right base still merges
    assert cp.returncode == 0 and (out / "config.json").is_file(), cp.stderr[-2000:]


@pytest.mark.slow
def test_chat_with_an_adapter_on_the_wrong_base_is_one_line(tiny_llama_adapter, narrower_llama, tiny_llama):
    line = _one_error_line(run_cli("chat", narrower_llama, "--adapter", tiny_llama_adapter, input="hi\n"))
    assert f"was trained on '{tiny_llama}'" in line and f"'{narrower_llama}'" in line
