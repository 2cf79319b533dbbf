"""Fault injection for tests, driven by the TUNELAB_FAULT environment variable, so that crash safety is
tested on the real code paths (never set it for real work). Comma-separated `name=value` pairs:

  kill_after_step=N           SIGKILL the process right after optimizer step N
  crash_in_checkpoint_write=N SIGKILL the process halfway through writing the N-th checkpoint of the run
  nan_loss_from_step=N        make every loss from optimizer step N on non-finite
  slow_tokenize=N             rank 0 sleeps N seconds before tokenising (ranks > 0 must outwait it)
"""
from __future__ import annotations

import os
import signal


def fault(name: str) -> int | None:
    """The value of an injected fault, or None."""
    for item in os.environ.get("TUNELAB_FAULT", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == name:
            return int(value)
    return None


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
