"""Recomputed layers whose inputs wait in pinned host memory instead of on the GPU (what Unsloth's offloaded
checkpointing does). The decoder offloads two units per layer, its attention half and its MLP half. A unit
keeps only its input for backward: tokens x hidden x 2 bytes.
Here that input goes to the host in forward, on a side stream while the unit itself computes (and the units
after it: the compute waits only once too many bytes are on their way, see HostStash), and comes back in
backward one unit ahead of its use, so the copies overlap the compute instead of pacing it. Two units per
layer, not one, because a unit's backward holds its own recomputed activations only: the MLP's backward
runs without the attention's q, k, v and output still held.

The attention half sends its attention output (and log-sum-exp) to the host too (`HostStash.attention`): its
recomputation then fetches them instead of running attention forward again, for one more tokens x hidden
copy each way, which the link carries while the GPU computes (a shorter step: bench/RESULTS.md).

Where the link has room left in forward, some MLP halves send their gate and up outputs too (`KeptOutputs`,
chosen by decoder.FastDecoder.output_layers_for): their recomputation takes them back instead of running the
two largest GEMMs of the layer again. They come back one (gate) and two (up) units early, since their copy
back takes longer than one unit's backward.

Where gate/up outputs go as well, the units of the top recomputed layers (decoder.RESIDENT_LAYERS) keep their
slots on the device: they would be the last copies out of a full link in forward and the first back in
backward, so the step would only wait for them.

The host buffers are allocated once per (slot, shape) and kept, so a captured CUDA graph (fast/graphs.py)
copies to and from the same memory at every replay; the graphs' first, eager step of a shape allocates them,
never a capture. On the CPU (the tests) the copies are plain."""
from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tunelab.fast.lora_gemm import is_recomputing, recomputing

# The attention kernels whose outputs (output, log-sum-exp, ...) the backward kernels take: what
# scaled_dot_product_attention and varlen_attn dispatch to, on the GPU and on the CPU.
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention",
                 "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "torch_attn::_varlen_attn"}


class HostStash:
    """The host copies of the recomputed units' inputs (and attention and group outputs), and the copies out and
    back that are in flight. A slot is (unit, name).

    Every copy runs on one side stream, in the order it was asked for. In forward the compute stream waits
    for a copy out only once more than `in_flight` bytes are on their way (the oldest first): until then the
    sources stay referenced, so their memory is not reused early, and a large group output delays the copies
    queued behind it without holding up the compute. In backward the copies back queue in the order they are
    needed: a unit's inputs before the group outputs that a unit further down takes."""

    def __init__(self, in_flight: int = 0):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.latest: dict[tuple, tuple] = {}  # slot -> the key of the buffer its last put filled
        self.prefetched: dict[tuple, tuple[torch.cuda.Event, torch.Tensor]] = {}
        self.outgoing: deque[tuple[torch.cuda.Event, torch.Tensor]] = deque()  # copies out not yet waited for
        self.in_flight = in_flight  # bytes of sources that outgoing may hold on the device (the decoder sets it)
        self.kept: dict[int, list] = {}  # unit -> its attention kernel's outputs (slot names, small tensors)
        self.fetch_in: dict[tuple, int] = {}  # a group output's slot -> the unit whose backward fetches it back
        self.resident: set[int] = set()  # units whose slots stay on the device (decoder.RESIDENT_LAYERS)
        self.on_device: dict[tuple, torch.Tensor] = {}  # their slots, from forward until backward takes them
        self._stream: torch.cuda.Stream | None = None

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    @staticmethod
    def _twin(host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """An empty device tensor laid out as `host` (a kernel's output comes back with its own strides)."""
        return torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=device)

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

    def put(self, unit: int, name: str, x: torch.Tensor, fetch_in: int | None = None) -> None:
        """Start copying `x` to the host (its strides kept: a kernel's output comes back as it was made).
        `fetch_in`: a group output that `unit`'s recomputation takes, which the backward of unit `fetch_in`
        fetches back (prefetch_outputs); otherwise the slot comes back with its unit's other inputs (prefetch)."""
        slot = unit, name
        self.prefetched.pop(slot, None)  # a copy back left by a backward that did not finish
        if unit in self.resident:
            self.latest.pop(slot, None)
            self.on_device[slot] = x
            return
        if fetch_in is not None:
            self.fetch_in[slot] = fetch_in
        key = slot, tuple(x.shape), x.stride(), x.dtype
        if key not in self.buffers:
            self.buffers[key] = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, pin_memory=x.is_cuda)
        self.latest[slot] = key
        if not x.is_cuda:
            self.buffers[key].copy_(x)
            return
        self.outgoing.append((self._copy_aside(self.buffers[key], x, x.device), x))
        held = sum(src.numel() * src.element_size() for _, src in self.outgoing)
        while held > self.in_flight and len(self.outgoing) > 1:  # the newest copy is never waited for at once
            done, src = self.outgoing.popleft()
            torch.cuda.current_stream(x.device).wait_event(done)
            held -= src.numel() * src.element_size()

    def reset(self) -> None:
        """Forget the copies in flight and the slots held on the device, keeping the host buffers: after a
        forward that did not finish (a failed CUDA graph capture, whose events cannot be waited on outside it)."""
        self.outgoing.clear()
        self.prefetched.clear()
        self.on_device.clear()
        self.kept.clear()

    def flush(self) -> None:
        """Make the current stream wait for every copy out, and let go of their sources (at the end of forward:
        the loss and backward need the room, and a slot fetched back without prefetch is copied on the current
        stream)."""
        while self.outgoing:
            done, _ = self.outgoing.popleft()
            torch.cuda.current_stream().wait_event(done)

    def prefetch(self, unit: int, device: torch.device) -> None:
        """Start copying `unit`'s slots back to the device (in backward, while the unit above runs)."""
        if device.type != "cuda":
            return
        self._fetch([slot for slot in self.latest if slot[0] == unit and slot not in self.fetch_in], device)

    def prefetch_outputs(self, unit: int, device: torch.device) -> None:
        """Start copying back the group outputs that `unit`'s backward fetches (put's `fetch_in`)."""
        if device.type == "cuda":
            self._fetch([slot for slot, at in self.fetch_in.items() if at == unit], device)

    def _fetch(self, slots: list, device: torch.device) -> None:
        for slot in slots:
            if slot in self.prefetched:
                continue
            host = self.buffers[self.latest[slot]]
            # allocated on the main stream, which frees it after its last use there (after it waited for the copy)
            back = self._twin(host, device)
            self.prefetched[slot] = (self._copy_aside(back, host, device), back)

    def take(self, unit: int, name: str, device: torch.device) -> torch.Tensor:
        """A slot's tensor on the device again."""
        slot = unit, name
        if slot in self.on_device:
            return self.on_device.pop(slot)
        if slot in self.prefetched:
            done, back = self.prefetched.pop(slot)
            torch.cuda.current_stream(back.device).wait_event(done)
            return back
        host = self.buffers[self.latest[slot]]
        return self._twin(host, device).copy_(host, non_blocking=True)

    def attention(self, unit: int, attend: Callable[..., torch.Tensor], *qkv: torch.Tensor) -> torch.Tensor:
        """attend(*qkv) in an offloaded unit. In forward its kernel's outputs go to the host; in the unit's
        recomputation they come back in place of running the kernel, and autograd records the kernel's node
        from them as if it had run. Where attend dispatches to no kernel of ATTENTION_OPS (none of them runs
        on this machine), it runs again as any recomputed op."""
        if is_recomputing():
            kept = self.kept.get(unit)
            if kept is None:
                return attend(*qkv)
            with _Replay(lambda: [self.take(unit, o, qkv[0].device) if isinstance(o, str) else o for o in kept]):
                return attend(*qkv)
        # the kernels make the log-sum-exp that backward needs only for inputs that require grad
        with torch.enable_grad(), _Capture() as capture:
            out = attend(*(t.detach().requires_grad_() for t in qkv))
        self.kept.pop(unit, None)
        if capture.outputs is not None:
            kept = []
            for i, o in enumerate(capture.outputs):
                # the output and log-sum-exp go; a random state or seed (0-d, 1-d) stays on the device
                if isinstance(o, torch.Tensor) and o.dim() >= 2 and o.numel() > 0:
                    self.put(unit, f"attention{i}", o)
                    o = f"attention{i}"
                kept.append(o)
            self.kept[unit] = kept
        return out.detach()


def _is_attention(func) -> bool:
    return func.name() in ATTENTION_OPS


class _Capture(TorchDispatchMode):
    """Notes the outputs of the attention kernel that runs inside it (the first, should there be several)."""

    outputs: tuple | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.outputs is None and _is_attention(func):
            self.outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return out


class _Replay(TorchDispatchMode):
    """Answers the first attention kernel called inside it with `outputs()` instead of running it."""

    def __init__(self, outputs: Callable[[], list]):
        super().__init__()
        self.outputs, self.done = outputs, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.done and _is_attention(func):
            self.done = True
            outputs = tuple(self.outputs())
            return outputs if len(outputs) > 1 else outputs[0]
        return func(*args, **(kwargs or {}))


class _OffloadedUnit(torch.autograd.Function):
    """y = run(x), keeping nothing on the device for backward: x waits on the host, and backward runs the
    unit again from it and back-propagates through that (the trainable parameters get their gradients
    there, as in PyTorch's reentrant checkpoint). They are inputs here only so that y requires grad when x
    does not (the first unit's input comes from a frozen embedding)."""

    @staticmethod
    def forward(ctx, x, stash: HostStash, unit: int, below: int | None, run: Callable, *params):
        ctx.stash, ctx.unit, ctx.below, ctx.run, ctx.x_grad = stash, unit, below, run, x.requires_grad
        stash.put(unit, "x", x)
        with torch.no_grad():
            y = run(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        stash = ctx.stash
        x = stash.take(ctx.unit, "x", grad.device)
        if ctx.below is not None:
            stash.prefetch(ctx.below, grad.device)  # the next unit down, while this one recomputes
        stash.prefetch_outputs(ctx.unit, grad.device)  # group outputs of a unit further down
        x = x.detach().requires_grad_(ctx.x_grad)
        with torch.enable_grad(), recomputing():
            y = ctx.run(x)
        torch.autograd.backward(y, grad)
        return (x.grad if ctx.x_grad else None, None, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 5)


class KeptOutputs:
    """A LoRA group's outputs (lora_gemm.project's `kept`) that go to the host in forward and that the unit's
    recomputation takes back instead of running the group's frozen GEMMs; output i comes back during the
    backward of unit `fetch_in[i]` (a unit above, whose backward runs earlier)."""

    def __init__(self, stash: HostStash, unit: int, fetch_in: Sequence[int]):
        self.stash, self.unit, self.fetch_in = stash, unit, fetch_in

    def put(self, i: int, y: torch.Tensor) -> None:
        self.stash.put(self.unit, f"out{i}", y, self.fetch_in[i])

    def take(self, i: int, device: torch.device) -> torch.Tensor:
        return self.stash.take(self.unit, f"out{i}", device)


def offloaded(stash: HostStash, unit: int, below: int | None, run: Callable[[torch.Tensor], torch.Tensor],
              x: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """run(x) for a recomputed unit whose input waits on the host (see the module's docstring); `unit`
    numbers the unit, and `below` is the next unit down that is offloaded too (its input is fetched back while
    this one recomputes)."""
    return _OffloadedUnit.apply(x, stash, unit, below, run, *params)
