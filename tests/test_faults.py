"""Faults from outside: the disk fills up during a checkpoint write, a merge is killed midway. Each is
injected by the test into a real `tunelab` subprocess (a prelude patches the OS-facing call, then runs the
CLI), never through hooks in tunelab itself."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, write_config

# A prelude that makes the FAIL_AT-th checkpoint (.pth temp file) write fail with ENOSPC after 4 KiB.
FULL_DISK = """
import errno, os, sys
real_fdopen, opened = os.fdopen, []

class FullDisk:
    def __init__(self, f):
        self.f, self.written = f, 0
    def write(self, data):
        if self.written + len(data) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

def fdopen(fd, *args, **kwargs):
    f = real_fdopen(fd, *args, **kwargs)
    if ".pth." in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
        opened.append(fd)
        if len(opened) == int(os.environ["FAIL_AT"]):
            return FullDisk(f)
    return f

os.fdopen = fdopen
from tunelab.cli import main
sys.exit(main(sys.argv[1:]))
"""

# A prelude that SIGKILLs the process right after save_pretrained wrote its first (KILL_AT=first) or its last
# (KILL_AT=last: model-0000N-of-0000N) weight shard.
KILL_IN_SAVE = """
import os, re, signal, sys
import transformers.modeling_utils as mu
real_save = mu.safe_save_file

def save_then_die(tensors, filename, *args, **kwargs):
    real_save(tensors, filename, *args, **kwargs)
    number, total = re.search(r"-(\\d+)-of-(\\d+)\\.safetensors$", filename).groups()
    if number == ("00001" if os.environ["KILL_AT"] == "first" else total):
        os.kill(os.getpid(), signal.SIGKILL)

mu.safe_save_file = save_then_die
from tunelab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_with(prelude: str, *args, cwd=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", prelude, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1", **env))


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_keeps_the_previous_one_and_stops_with_one_line(tiny_llama, data_dir, tmp_path):
    from tunelab.train.checkpoint import load_checkpoint

    cfg = write_config(tmp_path / "c.py", pretrained_model_name_or_path=str(tiny_llama), algorithm="lora",
                       lora_r=4, data_path=str(data_dir / "alpaca" / "alpaca_data_first102.json"), max_length=128,
                       pack_to_max_length=False, accumulative_counts=1, max_steps=3, save_steps=1,
                       gradient_checkpointing=False)
    work = tmp_path / "work"
    cp = _run_with(FULL_DISK, "train", cfg, "--work-dir", work, cwd=tmp_path, FAIL_AT="2")
    assert cp.returncode == 1, cp.stderr[-3000:]
    assert "Traceback" not in cp.stderr
    last = cp.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tunelab: error: could not write checkpoint {work / 'iter_2.pth'} (No space left")
    assert f"the last good checkpoint is {(work / 'iter_1.pth').resolve()}" in last and "--resume" in last
    assert sorted(p.name for p in work.iterdir() if p.name.endswith((".pth", ".tmp"))) == ["iter_1.pth"]
    assert Path((work / "last_checkpoint").read_text()).name == "iter_1.pth"
    assert load_checkpoint(work / "iter_1.pth")["meta"]["step"] == 1
    assert not (work / "hf").exists()


@pytest.mark.parametrize("kill_at", ["first", "last"])
@pytest.mark.slow
def test_merge_killed_midway_leaves_nothing_that_looks_like_a_model(tiny_llama, tiny_llama_adapter, tmp_path, kill_at):
    """Killed after the first or the last weight shard: no `merged` folder; chat and a new merge see none."""
    out = tmp_path / "merged"
    cp = _run_with(KILL_IN_SAVE, "convert", "merge", tiny_llama, tiny_llama_adapter, out, "--max-shard-size", "300KB",
                   KILL_AT=kill_at)
    assert cp.returncode == -signal.SIGKILL, cp.stderr[-2000:]
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert len(partial) == 1 and list(partial[0].glob("*.safetensors"))  # the killed write went to a temp folder
    cp = run_cli("chat", out, input="hi\n")
    assert cp.returncode == 2 and "not found" in cp.stderr and "Traceback" not in cp.stderr
    cp = run_cli("convert", "merge", tiny_llama, tiny_llama_adapter, out, "--max-shard-size", "300KB")
    assert cp.returncode == 0, cp.stderr[-2000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
