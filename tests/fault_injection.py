"""Faults injected into a tunelab process from outside, for the crash-safety tests: the product has no hooks for
them. A test runs the CLI with `fault_env(...)` (conftest), which sets TUNELAB_FAULT and puts tests/faults on
PYTHONPATH, so that every Python process of the run (torchrun's ranks included) loads tests/faults/sitecustomize.py,
which calls install(): each fault wraps a tunelab function right after its module is imported.

TUNELAB_FAULT holds comma-separated `name=value` pairs:
  kill_after_step=N           SIGKILL the process right after optimizer step N is logged (every rank)
  crash_in_checkpoint_write=N SIGKILL the process halfway through writing the N-th .pth checkpoint of the run
  nan_loss_from_step=N        every training loss from optimizer step N on is non-finite
  slow_tokenize=N             the rank that tokenises sleeps N seconds first (the other ranks must outwait it)
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import signal
import sys
import time


def parse(spec: str) -> dict[str, int]:
    pairs = (item.partition("=") for item in spec.split(",") if item.strip())
    return {key.strip(): int(value) for key, _, value in pairs}


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class CrashingFile:
    """A file wrapper that kills the process once `after` bytes were written (a torn checkpoint write)."""

    def __init__(self, f, after: int):
        self.f, self.after, self.written = f, after, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += n
        if self.written >= self.after:
            self.f.flush()
            kill_now()
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


# the optimizer step running now in one process and in the engines of several (0: none, e.g. an evaluation)
_step = {"single": 0, "engine": 0}


def _patches(faults: dict[str, int]) -> dict[str, list]:
    """module -> [(attribute path, wrapper of the original)]."""
    patches: dict[str, list] = {}

    def add(module: str, attr: str, wrap) -> None:
        patches.setdefault(module, []).append((attr, wrap))

    if "kill_after_step" in faults:
        def killing(step_method):
            def step(self, record):
                if step_method is not None:  # NullMonitor (ranks > 0) answers every call with a no-op
                    step_method(self, record)
                if record["step"] == faults["kill_after_step"]:
                    kill_now()
            return step
        add("tunelab.train.monitor", "RunMonitor.step", killing)
        add("tunelab.train.processes", "NullMonitor.step", killing)
    if "nan_loss_from_step" in faults:
        def stepping(where):
            def wrap(optimizer_step):
                def run(*args, **kwargs):
                    _step[where] = args[7]  # (model, window, ..., dtype, step), (self, window, ..., step)
                    try:
                        return optimizer_step(*args, **kwargs)
                    finally:
                        _step[where] = 0
                return run
            return wrap

        def poisoned(where):
            def wrap(losses):
                def run(*args, **kwargs):
                    out = losses(*args, **kwargs)
                    return out * float("inf") if _step[where] >= faults["nan_loss_from_step"] else out
                return run
            return wrap
        # one process: the micro-batch's loss, after its backward; several: the engines' per-token losses
        add("tunelab.train.step", "optimizer_step", stepping("single"))
        add("tunelab.train.step", "forward_backward", poisoned("single"))
        add("tunelab.train.engines", "DataParallelEngine.optimizer_step", stepping("engine"))
        add("tunelab.model.losses", "token_losses", poisoned("engine"))
    if "crash_in_checkpoint_write" in faults:
        writes = [0]

        def crashing(atomic_write_bytes):
            def run(path, write):
                if path.suffix == ".pth":
                    writes[0] += 1
                    if writes[0] == faults["crash_in_checkpoint_write"]:
                        return atomic_write_bytes(path, lambda f: write(CrashingFile(f, after=4096)))
                return atomic_write_bytes(path, write)
            return run
        add("tunelab.train.checkpoint", "atomic_write_bytes", crashing)
    if "slow_tokenize" in faults:
        def slow(tokenise_once):
            def run(ctx, cfg, model_path, work_dir, build):
                def late_build():
                    time.sleep(faults["slow_tokenize"])
                    return build()
                return tokenise_once(ctx, cfg, model_path, work_dir, late_build)
            return run
        add("tunelab.train.token_cache", "tokenise_once", slow)
    return patches


def _apply(module, patches) -> None:
    for attr, wrap in patches:
        owner = module
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, wrap(getattr(owner, name, None)))


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules to patch through the other finders and patches each once it has run."""

    def __init__(self, patches: dict[str, list]):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module, patches = spec.loader.exec_module, self.patches.pop(name)

        def exec_and_patch(module):
            exec_module(module)
            _apply(module, patches)
        spec.loader.exec_module = exec_and_patch
        return spec


def install(spec: str) -> None:
    """Arm the faults of `spec` (TUNELAB_FAULT's syntax) in this process."""
    patches = _patches(parse(spec))
    for name in [n for n in patches if n in sys.modules]:
        _apply(sys.modules[name], patches.pop(name))
    if patches:
        sys.meta_path.insert(0, _PatchAfterImport(patches))
