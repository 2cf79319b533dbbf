"""The generation worker behind `tunelab serve`: one thread owns the model and answers queued requests one
at a time; the queue is bounded so a flood of requests gets a quick 429 instead of piling up."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tunelab.model.generate import Generated, Sampling, generate_full

log = logging.getLogger("tunelab")


class QueueFull(Exception):
    """Too many requests are waiting; the caller should answer 429."""


@dataclass
class Job:
    """One chat completion to run. `on_event(kind, value)` is called from the worker thread with
    ("text", piece) while streaming, then once with ("done", Generated) or ("error", message)."""
    ids: list[int]
    stop_words: list[str]
    sampling: Sampling
    on_event: Callable[[str, object], None]
    seed: int | None = None
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)


class GenerationWorker:
    """Owns the model; `submit` queues a job (or raises QueueFull), the worker thread runs jobs in order."""

    def __init__(self, model, tokenizer, max_queue: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._closing = threading.Event()
        self.busy = False
        self.counts = {"completed": 0, "cancelled": 0, "rejected": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, name="tunelab-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        if self._closing.is_set():
            raise QueueFull("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.counts["rejected"] += 1
            raise QueueFull(f"the server is busy ({self.max_queue} requests waiting); retry later") from None

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what is running, drop what waits, and stop the worker."""
        self._closing.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.on_event("error", "the server is shutting down")
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._closing.is_set():
                if job is not None:
                    job.on_event("error", "the server is shutting down")
                return
            if job.cancelled.is_set():  # its client left while it waited
                self.counts["cancelled"] += 1
                job.on_event("done", Generated("", 0, "cancelled"))
                continue
            self.busy = True
            try:
                result = self._generate(job)
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
                log.exception("generation failed")
                self.counts["failed"] += 1
                job.on_event("error", f"generation failed: {type(exc).__name__}: {exc}")
            else:
                self.counts["cancelled" if result.finish_reason == "cancelled" else "completed"] += 1
                log.info("answered %d+%d tokens (%s) in %.2fs", len(job.ids), result.tokens,
                         result.finish_reason, time.monotonic() - job.queued_at)
                job.on_event("done", result)
            finally:
                self.busy = False

    def _generate(self, job: Job) -> Generated:
        if job.seed is not None:
            torch.manual_seed(job.seed)
        on_text = (lambda piece: job.on_event("text", piece)) if job.stream else None
        return generate_full(self.model, self.tokenizer, job.ids, job.stop_words, job.sampling, on_text,
                             cancel=lambda: job.cancelled.is_set() or self._closing.is_set())
