"""Recomputed layers whose inputs wait in pinned host memory instead of on the GPU (what Unsloth's offloaded
checkpointing does). The decoder offloads two units per layer, its attention half and its MLP half. A unit
keeps only its input for backward: tokens x hidden x 2 bytes, 16 MiB per 2,048 tokens of a 4096-wide model.
Here that input goes to the host in forward, on a side stream while the unit itself computes, and comes back
in backward one unit ahead of its use, so the copies overlap the compute instead of pacing it. Two units per
layer, not one, because a unit's backward holds its own recomputed activations only: the MLP's backward
runs without the attention's q, k, v and output still held.

The host buffers are allocated once per (unit, shape) and kept, so a captured CUDA graph (fast/graphs.py)
copies to and from the same memory at every replay; the graphs' first, eager step of a shape allocates them,
never a capture. On the CPU (the tests) the copies are plain."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from tunelab.fast.lora_gemm import recomputing


class HostStash:
    """The host copies of the recomputed units' inputs, and the copies back that are in flight."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.prefetched: dict[int, tuple[torch.cuda.Event, torch.Tensor]] = {}
        self._stream: torch.cuda.Stream | None = None

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    @staticmethod
    def _key(unit: int, x: torch.Tensor) -> tuple:
        return unit, tuple(x.shape), x.dtype

    def _buffer(self, unit: int, x: torch.Tensor) -> torch.Tensor:
        key = self._key(unit, x)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
        return self.buffers[key]

    def _copy_aside(self, dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> torch.cuda.Event:
        """dst <- src on the side stream, after what the current stream has queued; returns the event that
        marks the copy done (the current stream must wait on it before it touches dst or reuses src)."""
        side = self._side(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return done

    def put(self, unit: int, x: torch.Tensor) -> Callable[[], None]:
        """Start copying `x` to the host; returns the call that makes the current stream wait for that copy
        (made once the unit's own forward is queued, so the two overlap)."""
        self.prefetched.pop(unit, None)  # a copy back left by a backward that did not finish
        host = self._buffer(unit, x)
        if not x.is_cuda:
            host.copy_(x)
            return lambda: None
        main = torch.cuda.current_stream(x.device)
        done = self._copy_aside(host, x, x.device)
        # x stays referenced (by the caller) until the wait below is queued, so its memory is not reused early
        return lambda: main.wait_event(done)

    def prefetch(self, unit: int, like: torch.Tensor) -> None:
        """Start copying `unit`'s input back to the device (in backward, while the unit above runs)."""
        host = self.buffers.get(self._key(unit, like))
        if host is None or not like.is_cuda or unit in self.prefetched:
            return
        # allocated on the main stream, which frees it after its last use there (after it waited for the copy)
        back = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        self.prefetched[unit] = (self._copy_aside(back, host, like.device), back)

    def take(self, unit: int, like: torch.Tensor) -> torch.Tensor:
        """`unit`'s input on the device again."""
        if unit in self.prefetched:
            done, back = self.prefetched.pop(unit)
            torch.cuda.current_stream(back.device).wait_event(done)
            return back
        host = self.buffers[self._key(unit, like)]
        return host.to(like.device, non_blocking=True)


class _OffloadedUnit(torch.autograd.Function):
    """y = run(x), keeping nothing on the device for backward: x waits on the host, and backward runs the
    unit again from it and back-propagates through that (the trainable parameters get their gradients
    there, as in PyTorch's reentrant checkpoint). They are inputs here only so that y requires grad when x
    does not (the first unit's input comes from a frozen embedding)."""

    @staticmethod
    def forward(ctx, x, stash: HostStash, unit: int, below: int | None, run: Callable, *params):
        ctx.stash, ctx.unit, ctx.below, ctx.run, ctx.x_grad = stash, unit, below, run, x.requires_grad
        ctx.like = torch.empty((1,), dtype=x.dtype, device=x.device).expand(x.shape)  # shape, dtype, device
        settle = stash.put(unit, x)
        with torch.no_grad():
            y = run(x)
        settle()
        return y

    @staticmethod
    def backward(ctx, grad):
        stash = ctx.stash
        x = stash.take(ctx.unit, ctx.like)
        if ctx.below is not None:
            stash.prefetch(ctx.below, ctx.like)  # the next unit down, while this one recomputes
        x = x.detach().requires_grad_(ctx.x_grad)
        with torch.enable_grad(), recomputing():
            y = ctx.run(x)
        torch.autograd.backward(y, grad)
        return (x.grad if ctx.x_grad else None, None, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 5)


def offloaded(stash: HostStash, unit: int, below: int | None, run: Callable[[torch.Tensor], torch.Tensor],
              x: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """run(x) for a recomputed unit whose input waits on the host (see the module's docstring); `unit`
    numbers the unit, and `below` is the next unit down that is offloaded too (its input is fetched back while
    this one recomputes)."""
    return _OffloadedUnit.apply(x, stash, unit, below, run, *params)
