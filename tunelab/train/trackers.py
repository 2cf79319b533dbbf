"""Experiment trackers named in report_to besides TensorBoard: Weights & Biases, MLflow and SwanLab. Each gets the
run's config once and the same scalars as scalars.json and TensorBoard (train/loss, train/lr, ..., eval/val_loss)
at their steps. Each package is optional and imported only when named; each reads its usual environment
(WANDB_MODE, WANDB_PROJECT, MLFLOW_TRACKING_URI, SWANLAB_MODE, ...)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "swanlab": "swanlab"}


def _require(name: str):
    import importlib

    try:
        return importlib.import_module(PACKAGES[name])
    except ImportError:
        raise UserError(f"report_to names '{name}', which is not installed: pip install 'tunelab[{name}]' "
                        f"(or drop it from report_to)") from None


def check_installed(names: list[str]) -> None:
    """Before training starts: every tracker named is importable."""
    for name in names:
        if name != "tensorboard":
            _require(name)


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """Config values as trackers' parameters take them: scalars as they are, lists and dicts as JSON."""
    return {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v, ensure_ascii=False)
            for k, v in config.items()}


class WandbTracker:
    def __init__(self, run_dir: Path, name: str, config: dict):
        wandb = _require("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunelab"), name=f"{name}/{run_dir.name}",
                              config=config, dir=str(run_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """A run in the experiment named after the config, stored in the work dir's mlflow.db (MLflow's local
    SQLite store; its plain-folder store needs MLFLOW_ALLOW_FILE_STORE=true since MLflow 3.7) unless
    MLFLOW_TRACKING_URI says otherwise."""

    def __init__(self, run_dir: Path, name: str, config: dict):
        mlflow = _require("mlflow")
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}")
        mlflow.set_experiment(name)
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:6000] for k, v in _flat(config).items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class SwanlabTracker:
    def __init__(self, run_dir: Path, name: str, config: dict):
        swanlab = _require("swanlab")
        self.swanlab = swanlab
        swanlab.init(project=os.environ.get("SWANLAB_PROJECT", "tunelab"), experiment_name=f"{name}/{run_dir.name}",
                     config=config, logdir=str(run_dir / "swanlog"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.swanlab.log(metrics, step=step)

    def close(self) -> None:
        self.swanlab.finish()


_OPEN = {"wandb": WandbTracker, "mlflow": MlflowTracker, "swanlab": SwanlabTracker}
_HINTS = {"wandb": "run `wandb login` or set WANDB_API_KEY, or WANDB_MODE=offline",
          "mlflow": "check MLFLOW_TRACKING_URI", "swanlab": "run `swanlab login`, or set SWANLAB_MODE=local"}


def open_trackers(names: list[str], run_dir: Path, name: str, config: dict) -> list:
    """The trackers of report_to other than TensorBoard (which RunMonitor writes itself), started; one that
    cannot start (no login, a bad store) is one line, and those started before it are closed."""
    started = []
    try:
        for tracker in names:
            if tracker == "tensorboard":
                continue
            try:
                started.append(_OPEN[tracker](run_dir, name, _flat(config)))
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - each package has its own errors for this
                reason = (str(exc).strip().splitlines() or [""])[0]
                raise UserError(f"report_to '{tracker}': could not start a run ({type(exc).__name__}: {reason}); "
                                f"{_HINTS[tracker]}") from None
    except BaseException:
        for tracker in started:
            tracker.close()
        raise
    return started
