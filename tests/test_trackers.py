"""Acceptance (issue 33, point 5): a run with report_to wandb (offline) and mlflow (a local store) leaves in each
tracker the loss series of scalars.json; a tracker that is not installed stops the run before it starts."""
from __future__ import annotations

import importlib.util
import json
import struct

import pytest

from conftest import run_cli, write_config
from tunelab.config.loader import load_config
from tunelab.errors import ConfigError, UserError
from tunelab.train.loop import train


def _config(tiny_llama, **over):
    values = dict(pretrained_model_name_or_path=str(tiny_llama), max_steps=4, log_interval=1, evaluation_inputs=[],
                  evaluation_data_path="builtin:self_cognition", evaluation_freq=2, **over)
    return load_config("demo", [f"{k}={v!r}" for k, v in values.items()])


def wandb_history(path) -> list[dict]:
    """The history rows of an offline run's .wandb file: after a 7-byte header, LevelDB log blocks of 32 KiB whose
    records (7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last) are protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding that ends a block
            pos += room
            continue
        pending = (b"" if kind in (1, 2) else pending) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("wandb", "mlflow")),
                    reason="wandb or mlflow is not installed (pip install 'tunelab[wandb,mlflow]')")
def test_wandb_and_mlflow_hold_the_scalars_json_losses(tiny_llama, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, name = _config(tiny_llama, report_to=["tensorboard", "wandb", "mlflow"])
    train(cfg, name, work_dir=str(tmp_path))
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name[0].isdigit()]
    records = [json.loads(line) for line in (run_dir / "vis_data" / "scalars.json").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    val_losses = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and sorted(val_losses) == [0, 2, 4]

    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = wandb_history(wandb_file)
    assert {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r} == losses
    assert {r["_step"]: r["eval/val_loss"] for r in rows if "eval/val_loss" in r} == val_losses

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.data.params["lr"] == "0.001" and run.data.params["report_to"] == '["tensorboard", "wandb", "mlflow"]'
    for key, want in (("train/loss", losses), ("eval/val_loss", val_losses)):
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert got.keys() == want.keys()
        assert all(abs(got[s] - want[s]) < 1e-6 for s in want)


def test_report_to_names_are_checked(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match=r"'report_to' may hold tensorboard, wandb, mlflow, swanlab, got 'wand' "
                                          r"\(did you mean 'wandb'\?\)"):
        _config(tiny_llama, report_to=["wand"])
    if importlib.util.find_spec("swanlab") is None:
        cfg, name = _config(tiny_llama, report_to=["swanlab"])
        with pytest.raises(UserError, match=r"^report_to names 'swanlab', which is not installed: pip install "
                                            r"'tunelab\[swanlab\]' \(or drop it from report_to\)$"):
            train(cfg, name, work_dir=str(tmp_path))
        assert not any(p.name[0].isdigit() for p in tmp_path.iterdir())  # no run folder was started


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_a_tracker_that_cannot_start_is_one_line(tiny_llama, tmp_path, monkeypatch):
    """wandb online without a login: exit 2 with one line, no run folder (a fresh process: wandb keeps its mode)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no stored wandb login
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = write_config(tmp_path / "run.py", pretrained_model_name_or_path=str(tiny_llama), algorithm="lora",
                          data_path="builtin:self_cognition", max_steps=1, report_to=["tensorboard", "wandb"])
    cp = run_cli("train", config, "--work-dir", tmp_path / "work", cwd=tmp_path)
    assert cp.returncode == 2, cp.stderr[-2000:]
    assert cp.stderr.strip().splitlines()[-1] == (
        "tunelab: error: report_to 'wandb': could not start a run (UsageError: No API key configured. Use `wandb "
        "login` to log in.); run `wandb login` or set WANDB_API_KEY, or WANDB_MODE=offline")
    assert not any(p.name[0].isdigit() for p in (tmp_path / "work").iterdir())
