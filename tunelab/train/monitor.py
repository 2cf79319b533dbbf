"""Seeing a run: the work-dir layout, the text log, scalars.json, TensorBoard events, a progress bar on a
terminal (plain log lines otherwise) and a loss / learning-rate curve PNG."""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("tunelab")


class RunMonitor:
    """Everything a run writes about itself, under work_dirs/<name>/<timestamp>/."""

    def __init__(self, root: Path, total_steps: int, log_interval: int, config_text: str, name: str,
                 report_to: tuple[str, ...] | list[str] = ("tensorboard",), config: dict | None = None):
        from tunelab.train.trackers import check_installed, open_trackers

        check_installed(report_to)  # before anything is written
        self.root, self.total_steps, self.log_interval = root, total_steps, log_interval
        stamp = time.strftime("%Y%m%d_%H%M%S")
        self.dir = root / stamp
        n = 1
        while self.dir.exists():  # two runs in the same second (e.g. a quick resume)
            n += 1
            self.dir = root / f"{stamp}_{n}"
        (self.dir / "vis_data").mkdir(parents=True)
        try:
            self.trackers = open_trackers(list(report_to), self.dir, name, config or {})
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        (root / f"{name}.py").write_text(config_text, encoding="utf-8")
        (self.dir / "vis_data" / "config.py").write_text(config_text, encoding="utf-8")
        self.scalars_path = self.dir / "vis_data" / "scalars.json"
        self.history: list[dict[str, Any]] = []
        self.file_handler = logging.FileHandler(self.dir / f"{self.dir.name}.log", encoding="utf-8")
        self.file_handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
        log.addHandler(self.file_handler)
        if not log.isEnabledFor(logging.INFO):  # called as a library: the run's log file still gets INFO
            log.setLevel(logging.INFO)
        self.tensorboard = _tensorboard_writer(self.dir / "tensorboard") if "tensorboard" in report_to else None
        self.bar = None
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []
        self.started = time.time()

    def set_position(self, step: int) -> None:
        """Training starts (at a checkpoint's step when resumed): on a terminal, show the progress bar."""
        self._first_step = step
        self.started = time.time()
        if sys.stderr.isatty():
            self.bar = _progress_bar(self.total_steps, step)
            self._route_console_through_bar()

    def _route_console_through_bar(self) -> None:
        """Log lines printed on the terminal go above the bar instead of breaking it."""
        for handler in list(log.handlers):
            if type(handler) is logging.StreamHandler:
                replacement = _BarHandler()
                replacement.setFormatter(handler.formatter)
                log.removeHandler(handler)
                log.addHandler(replacement)
                self._swapped.append((handler, replacement))

    def step(self, record: dict[str, Any]) -> None:
        """One optimizer step's figures: to the bar every step, to logs every log_interval steps."""
        step = record["step"]
        self.history.append(record)  # every step goes into the curve; only some into the files
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{record['memory_gb']:.1f}G",
                                 refresh=False)
        if step % self.log_interval and step not in (1, self.total_steps):
            return
        self._write_scalars(record, remember=False)
        elapsed = time.time() - self.started
        done = step - getattr(self, "_first_step", 0)
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        line = (f"epoch {record['epoch']} step {step}/{self.total_steps} | loss {record['loss']:.4f} | "
                f"lr {record['lr']:.3g} | {record['tokens_per_s']:.0f} tok/s | mem {record['memory_gb']:.2f} GiB | "
                f"eta {eta:.0f}s")
        if "reward_margin" in record:
            line += f" | margin {record['reward_margin']:.3f} | reward acc {record['reward_accuracy']:.2f}"
        if self.bar is not None:
            self.file_handler.emit(log.makeRecord(log.name, logging.INFO, "", 0, line, None, None))
        else:
            log.info(line)

    def scalars(self, record: dict[str, Any]) -> None:
        """Extra figures (e.g. validation loss) at a step."""
        self._write_scalars(record)
        log.info(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    def _write_scalars(self, record: dict[str, Any], remember: bool = True) -> None:
        if remember:
            self.history.append(record)
        with open(self.scalars_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        metrics = {f"eval/{key}" if key.startswith("val_") else f"train/{key}": value for key, value in record.items()
                   if key not in ("step", "epoch") and isinstance(value, (int, float))}
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()
        for tracker in self.trackers:
            tracker.log(metrics, record["step"])

    def eval_answers(self, answers: list[dict]) -> None:
        with open(self.dir / "eval_answers.jsonl", "a", encoding="utf-8") as f:
            for answer in answers:
                f.write(json.dumps(answer, ensure_ascii=False) + "\n")
        if self.tensorboard is not None:
            for a in answers:
                self.tensorboard.add_text("eval/answers", f"**{a['input']}** -> {a['output']}", a["step"])

    def plot(self) -> Path | None:
        """loss_curve.png: training loss (and validation loss), a preference run's reward margin and accuracy, and
        learning rate against step."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        train = [r for r in self.history if "loss" in r]
        val = [r for r in self.history if "val_loss" in r]
        if not train:
            return None
        preference = [r for r in self.history if "reward_margin" in r]
        fig, axes = plt.subplots(3 if preference else 2, 1, figsize=(8, 9 if preference else 6), sharex=True)
        ax_loss, ax_lr = axes[0], axes[-1]
        if preference:
            _plot_rewards(axes[1], preference, [r for r in self.history if "val_reward_margin" in r])
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        if val:
            ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_xlabel("step")
        ax_lr.grid(alpha=0.3)
        fig.tight_layout()
        path = self.dir / "loss_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for original, replacement in self._swapped:
            log.removeHandler(replacement)
            log.addHandler(original)
        if self.tensorboard is not None:
            self.tensorboard.close()
        for tracker in self.trackers:
            tracker.close()
        log.removeHandler(self.file_handler)
        self.file_handler.close()


def _plot_rewards(ax, train: list[dict], val: list[dict]) -> None:
    """Reward margin (left axis) and reward accuracy (right axis, 0 to 1), training and held-out."""
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["reward_margin"] for r in train], color="tab:green", label="reward margin")
    if val:
        ax.plot([r["step"] for r in val], [r["val_reward_margin"] for r in val], "o-", color="tab:olive",
                label="held-out reward margin")
    ax.set_ylabel("reward margin")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    accuracy = ax.twinx()
    accuracy.plot(steps, [r["reward_accuracy"] for r in train], color="tab:purple", alpha=0.5, label="reward accuracy")
    if val:
        accuracy.plot([r["step"] for r in val], [r["val_reward_accuracy"] for r in val], "s-", color="tab:purple",
                      label="held-out reward accuracy")
    accuracy.set_ylim(0, 1.05)
    accuracy.set_ylabel("reward accuracy")
    accuracy.legend(loc="lower right")


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        log.info("tensorboard is not installed: no event files (pip install tensorboard)")
        return None
    return SummaryWriter(str(folder))


def _progress_bar(total: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)


class _BarHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)
