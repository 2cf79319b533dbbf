"""Runs you can leave alone: exact resume after SIGKILL, torn checkpoint writes, Ctrl-C/SIGTERM, NaN steps."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fault_env, run_losses, write_config
from tunelab.train.checkpoint import load_checkpoint


@pytest.fixture()
def cfg_file(tmp_path, tiny_llama, data_dir):
    """Packing + gradient accumulation + batches of 2 + LoRA dropout (so the RNG state matters)."""
    return write_config(
        tmp_path / "run.py", pretrained_model_name_or_path=str(tiny_llama), algorithm="lora",
        data_path=str(data_dir / "alpaca" / "alpaca_data_first102.json"), prompt_template="internlm_chat",
        max_length=160, pack_to_max_length=True, batch_size=2, accumulative_counts=2, max_steps=40,
        lr=1e-3, lora_r=8, lora_alpha=16, lora_dropout=0.1, gradient_checkpointing=False, save_steps=5,
        log_interval=1, evaluation_inputs=[])


def _env(**extra) -> dict:
    return dict(os.environ, **extra)


def _run(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunelab", *map(str, args)], capture_output=True, text=True,
                          env=env or os.environ.copy(), cwd=cwd, timeout=600)


# the fast path (forced on, as on a GPU) with recomputed layers whose inputs wait on the host: its LoRA dropout
# draws a seed per projection and forward from torch's generator, which the checkpoint's random state restores
FAST_OFFLOADED = ("--cfg-options", "fast_path=on", "gradient_checkpointing=True", "offload_checkpoints=True")


@pytest.mark.parametrize("options", [(), FAST_OFFLOADED], ids=["plain", "fast_offloaded"])
@pytest.mark.slow
def test_resume_after_sigkill_is_exact(cfg_file, tmp_path, options):
    """Acceptance 1: killed at step 23 and resumed, steps 24..40 have the losses of an uninterrupted run."""
    cp = _run("train", cfg_file, "--work-dir", tmp_path / "straight", *options)
    assert cp.returncode == 0, cp.stderr[-3000:]
    if options:
        assert "LoRA as GEMM groups" in cp.stderr and "inputs on the host" in cp.stderr, cp.stderr[-3000:]
    cp = _run("train", cfg_file, "--work-dir", tmp_path / "killed", *options,
              env=_env(**fault_env("kill_after_step=23")))
    assert cp.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "killed" / "iter_20.pth")["meta"]["step"] == 20
    cp = _run("train", cfg_file, "--work-dir", tmp_path / "killed", "--resume", *options)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "resumed from" in cp.stderr and "iter_20.pth at step 20" in cp.stderr
    straight, resumed = run_losses(tmp_path / "straight"), run_losses(tmp_path / "killed")
    assert sorted(straight) == list(range(1, 41)) and set(range(1, 41)) <= set(resumed)
    for step in range(24, 41):
        assert abs(straight[step] - resumed[step]) <= 1e-6, (step, straight[step], resumed[step])
    # the final adapters agree too
    a = load_checkpoint(tmp_path / "straight" / "iter_40.pth")["model"]
    b = load_checkpoint(tmp_path / "killed" / "iter_40.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_torn_checkpoint_write_keeps_previous(cfg_file, tmp_path):
    """Acceptance 2: a crash halfway through writing a checkpoint leaves the previous one usable."""
    work = tmp_path / "w"
    cp = _run("train", cfg_file, "--work-dir", work, env=_env(**fault_env("crash_in_checkpoint_write=2")))
    assert cp.returncode == -signal.SIGKILL
    assert not (work / "iter_10.pth").exists() and list(work.glob(".iter_10.pth.*.tmp"))
    assert Path((work / "last_checkpoint").read_text().strip()).name == "iter_5.pth"
    assert load_checkpoint(work / "iter_5.pth")["meta"]["step"] == 5
    cp = _run("train", cfg_file, "--work-dir", work, "--resume", "--cfg-options", "max_steps=12")
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "iter_5.pth at step 5" in cp.stderr
    assert not list(work.glob(".*.tmp"))  # the torn temp file was cleaned up


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back(cfg_file, tmp_path):
    work = tmp_path / "w"
    cp = _run("train", cfg_file, "--work-dir", work, "--cfg-options", "max_steps=10")
    assert cp.returncode == 0, cp.stderr[-3000:]
    newest = work / "iter_10.pth"
    newest.write_bytes(newest.read_bytes()[:1000])  # e.g. a full disk
    cp = _run("train", cfg_file, "--work-dir", work, "--resume", "--cfg-options", "max_steps=12")
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "skipping unusable checkpoint" in cp.stderr and "iter_5.pth at step 5" in cp.stderr


@pytest.mark.slow
def test_resume_without_checkpoint_is_bad_input(cfg_file, tmp_path):
    cp = _run("train", cfg_file, "--work-dir", tmp_path / "empty", "--resume")
    assert cp.returncode == 2 and "no checkpoint" in cp.stderr and "Traceback" not in cp.stderr


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_signal_saves_checkpoint_and_exits_cleanly(cfg_file, tmp_path, sig, code):
    """Acceptance 3: SIGINT (Ctrl-C) or SIGTERM writes a checkpoint and exits without a traceback."""
    work = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg_file), "--work-dir", str(work),
                             "--cfg-options", "max_steps=100000", "save_steps=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(run_losses(work)) < 3:
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    assert "checkpoint saved to" in err and "--resume" in err.splitlines()[-1]
    state = load_checkpoint((work / "last_checkpoint").read_text().strip())
    assert state["meta"]["step"] >= 3


@pytest.mark.slow
def test_nan_steps_are_skipped_then_the_run_stops(cfg_file, tmp_path):
    """Acceptance 4: non-finite losses are skipped and counted; after max_bad_steps in a row, a one-line stop."""
    work = tmp_path / "w"
    cp = _run("train", cfg_file, "--work-dir", work, "--cfg-options", "max_bad_steps=4", "save_steps=2",
              env=_env(**fault_env("nan_loss_from_step=5")))
    assert cp.returncode == 1, cp.stderr[-3000:]
    last = cp.stderr.strip().splitlines()[-1]
    assert last.startswith("tunelab: error: training stopped at step 8: 4 steps in a row had a non-finite")
    assert "iter_4.pth" in last and "Traceback" not in cp.stderr
    assert cp.stderr.count("skipped: non-finite") == 4
    good = load_checkpoint(work / "iter_4.pth")
    assert good["meta"]["step"] == 4 and all(torch.isfinite(v).all() for v in good["model"].values())
    assert not (work / "iter_6.pth").exists() and not (work / "iter_8.pth").exists()


@pytest.mark.slow
def test_resume_from_every_position(tmp_path, tiny_llama, data_dir):
    """--resume after a SIGKILL before the first checkpoint (trains from the start), after an epoch boundary's
    checkpoint, and on a finished run (before and after its hf/ was written): each ends with exit 0 and the
    uninterrupted run's losses; a finished run only writes the export it lacks."""
    cfg = write_config(
        tmp_path / "run.py", pretrained_model_name_or_path=str(tiny_llama), algorithm="lora",
        data_path=str(data_dir / "alpaca" / "alpaca_data_first102.json"), prompt_template="internlm_chat",
        max_length=160, pack_to_max_length=True, batch_size=2, accumulative_counts=2, max_epochs=2, lr=1e-3,
        lora_r=8, lora_alpha=16, lora_dropout=0.1, gradient_checkpointing=False, save_steps=0, log_interval=1,
        evaluation_inputs=[])
    straight = tmp_path / "straight"
    cp = _run("train", cfg, "--work-dir", straight)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "20 steps per epoch, 40 steps in all" in cp.stderr  # the data this test's positions are set for
    reference = run_losses(straight)
    assert sorted(reference) == list(range(1, 41))

    for kill_after, resumed_at in [(3, None), (21, 20)]:
        work = tmp_path / f"killed_{kill_after}"
        cp = _run("train", cfg, "--work-dir", work, env=_env(**fault_env(f"kill_after_step={kill_after}")))
        assert cp.returncode == -signal.SIGKILL
        cp = _run("train", cfg, "--work-dir", work, "--resume")
        assert cp.returncode == 0, cp.stderr[-3000:]
        if resumed_at is None:
            assert "stopped before its first checkpoint; training from the start" in cp.stderr
        else:
            assert f"epoch_1.pth at step {resumed_at}" in cp.stderr
        losses = run_losses(work)
        for step in range(1, 41):
            assert abs(losses[step] - reference[step]) <= 1e-6, (kill_after, step, losses[step], reference[step])
        assert (work / "hf" / "adapter_model.safetensors").is_file()

    adapter = (straight / "hf" / "adapter_model.safetensors").read_bytes()
    cp = _run("train", cfg, "--work-dir", straight, "--resume")  # finished, exported
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr[-3000:]
    assert "the run is complete (step 40 of 40)" in cp.stderr
    assert (straight / "hf" / "adapter_model.safetensors").read_bytes() == adapter
    import shutil
    shutil.rmtree(straight / "hf")  # killed after its last checkpoint, before the export
    cp = _run("train", cfg, "--work-dir", straight, "--resume")
    assert cp.returncode == 0 and "writing its adapter/model" in cp.stderr, cp.stderr[-3000:]
    assert (straight / "hf" / "adapter_model.safetensors").read_bytes() == adapter
    assert sorted(run_losses(straight)) == list(range(1, 41))  # no step ran twice
