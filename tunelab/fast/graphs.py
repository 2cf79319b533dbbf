"""The fast path's forward, loss and backward captured as one CUDA graph per batch shape, then replayed.

Why: with its layers compiled, a step spent about as long in Python launching kernels (the guards and
wrappers of each compiled region, autograd's bookkeeping) as the GPU spent running them.
A replayed graph launches the whole micro-batch at once. What that takes:
* fixed shapes: rows are padded to a bucket of widths (a packed run's to the widest it has had), and there is
  one graph per (rows, width) and, for packed rows, per bucket of sample count (powers of two), so an epoch
  needs few captures. The first batch
  of a (rows, width) runs eagerly (it compiles the layers for that shape); after that each new layout bucket
  is captured when first met and replayed ever after;
* fixed gradient buffers. The first graph captured starts from no gradients, as an eager step after
  zero_grad does: its backward allocates each gradient when it is produced, late in the step, where memory
  freed by the activations is reused, so a step peaks no higher than eagerly; those tensors become the
  gradient buffers for good, the graph overwrites them, and it is replayed whenever a step of its shape
  starts from no gradients. Every other graph (another shape, or adding to gradients already there:
  accumulation) adds into those buffers in place, and holds them through its whole step;
* no torch random state to replay in a recomputation (the caller enables graphs only where none is: LoRA
  dropout in the GEMM groups makes its masks from seeds that the graph draws at every replay, see
  fast/dropout.py) and no GPU sync inside the step (the layout is worked out on the CPU);
* no eager autograd graph over the parameters still alive (a loss kept undetached): its gradient nodes
  remember the default stream, which a capture may not wait on, and the capture fails.
A preference step (DPO, ORPO, SimPO, KTO) is two graphs: forward, whose per-token losses the objective reads
between the replays (its loss needs every answer's log-prob, a sum over the answer's tokens), and backward,
which takes d loss / d token loss as per-token weights: the same gradient, since each token's loss enters the
objective only through that weight. A reference pass (the base alone, no gradient) is a forward graph.
Graphs share one memory pool: a step replays its graphs and reads their outputs before the next step replays.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch

from tunelab.fast.attention import PackedLayout, packed_layout, width_bucket
from tunelab.data.dataset import PAD_VALUES

log = logging.getLogger("tunelab")

_INPUTS = ("input_ids", "position_ids", "targets")
MAX_GRAPHS = 8  # each holds its inputs and keeps the shared pool at its peak; rarer shapes run eagerly


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pad_width(batch: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Right-pad the rows to `width` as collate pads them (data.dataset.PAD_VALUES)."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": 0, **PAD_VALUES}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) if k in fill else v for k, v in batch.items()}


def _why(exc: BaseException) -> str:
    """One line on a failed capture. Ending the capture raises its own error ('operation failed due to a
    previous error during capture') over the one that broke it, so the first in the chain is named too."""
    def line(e: BaseException) -> str:
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    first = exc
    for _ in range(8):
        if first.__context__ is None:
            break
        first = first.__context__
    return line(exc) if first is exc else f"{line(exc)}; first: {line(first)}"


def _release_generators() -> None:
    """An empty capture begins and ends the CUDA generators' hold again (a capture whose end failed keeps it),
    so that the eager steps after a failed capture can draw random numbers (dropout seeds, initialisation)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the CUDA graph is empty"
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                pass
    except Exception as exc:  # training without random ops still runs; with them, this says why they fail
        log.warning("fast path: could not reset the CUDA random generator after the failed capture (%s)", exc)


def objective_weights(loss_of: Callable[[torch.Tensor], torch.Tensor],
                      losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_of(losses), d loss / d losses), for per-token losses that a forward left without their autograd
    graph: back-propagating `losses` with these weights gives the objective's gradient (a preference step's
    two graphs)."""
    losses = losses.detach().requires_grad_()
    loss = loss_of(losses)
    (weights,) = torch.autograd.grad(loss, losses)
    return loss.detach(), weights


class _Graph:
    """One captured micro-batch: static inputs the batch is copied into, the graph and its output: the loss
    (SFT), or the per-token losses (a preference step's forward, whose `backward` graph reads `weights`; a
    reference pass)."""

    def __init__(self, shape: tuple[int, int], device: torch.device, capacity: int):
        self.inputs = {k: torch.zeros(shape, dtype=torch.long, device=device) for k in _INPUTS}
        self.n_targets = torch.ones((), dtype=torch.float32, device=device)
        cu = torch.zeros(capacity + 1, dtype=torch.int32, device=device) if capacity else None
        self.layout = PackedLayout(cu is None, cu, shape[1], None)
        self.graph = torch.cuda.CUDAGraph()
        self.loss: torch.Tensor | None = None
        self.losses: torch.Tensor | None = None
        self.backward: torch.cuda.CUDAGraph | None = None
        self.weights: torch.Tensor | None = None

    def load(self, batch: dict[str, torch.Tensor], n_targets: int, cu: torch.Tensor | None) -> None:
        for k in _INPUTS:
            self.inputs[k].copy_(batch[k], non_blocking=True)
        self.n_targets.fill_(n_targets)
        if cu is not None:
            self.layout.cu_seqlens.copy_(cu, non_blocking=True)


class GraphedSteps:
    """forward + loss + backward of a FastDecoder as CUDA graphs, for the parameters `params`."""

    def __init__(self, fast, params: list[torch.nn.Parameter]):
        self.fast = fast
        self.params = params
        self.device = params[0].device
        self.graphs: dict[tuple, _Graph] = {}
        # (rows, width, one sample a row) that ran eagerly once: a width compiles its layers there, and each
        # attention kernel (cuDNN for one sample a row, varlen flash for packed rows) plans its first call there,
        # outside a capture (cuDNN's planning allocates device memory, which a capture may not)
        self.warm: set[tuple[int, int, bool]] = set()
        self.packed_width: dict[int, int] = {}  # rows -> the widest width packed rows have had
        self.failed: dict[tuple, str] = {}  # shapes whose capture failed -> why
        self.grads: list[torch.Tensor] | None = None
        self.pool = None  # one memory pool for every graph, made at the first capture
        self.abandoned: list[torch.cuda.CUDAGraph] = []  # failed captures that an allocator still refers to (_recover)

    def forward_backward(self, batch: dict[str, torch.Tensor], dtype: torch.dtype, n_targets: int,
                         loss_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | None:
        """loss = (sum of per-token losses) / n_targets, or loss_of(per-token losses) (a preference objective's,
        train.objective), its gradient added to the parameters' .grad; returns the loss (0-dim), or None where
        the caller should run the batch its own way (fp32, a shape that cannot be captured, too many shapes)."""
        if dtype == torch.float32:  # flash attention (varlen) needs half precision; fp32 is a test setting
            return None
        width = batch["input_ids"].shape[1]
        batch, key, cu = self._shape(batch, () if loss_of is None else ("preference",))
        if key in self.failed:
            return None
        b, n, _ = key[-3:]
        if (b, n, cu is None) not in self.warm:
            # eagerly, at the padded width: this compiles the layers for it and plans the attention kernel,
            # which must not happen during a capture; other packings of the same width then need no eager run
            self.warm.add((b, n, cu is None))
            losses = self.fast.token_losses(batch, dtype, self._eager_layout(cu, n))
            loss = losses.sum() / n_targets if loss_of is None else loss_of(losses[:, :width])
            loss.backward()
            return loss.detach()
        # the graph that overwrites the gradients, where it is this shape's and nothing is there to add to
        fresh = self.grads is None or (key + (True,) in self.graphs and all(p.grad is None for p in self.params))
        gkey = key + (fresh,)
        graph = self.graphs.get(gkey)
        if graph is None and len(self.graphs) >= MAX_GRAPHS:
            return None
        # gradients that the first capture found already there (from eager steps) are added afterwards
        before = [p.grad for p in self.params] if fresh else None
        if not fresh:
            self._bind_grads()  # before a capture too: the captured backward adds into these buffers
        if graph is None:
            graph = self._capture_or_fail(key, fresh, dtype)
            if graph is None:
                return None
            self.graphs[gkey] = graph
        graph.load(batch, n_targets, cu)
        graph.graph.replay()
        if loss_of is None:
            loss = graph.loss.detach().clone()
        else:
            loss, weights = objective_weights(loss_of, graph.losses[:, :width])
            graph.weights.zero_()  # padding: 0
            graph.weights[:, :width].copy_(weights)
            graph.backward.replay()
        if fresh:
            for p, buf, had in zip(self.params, self.grads, before):
                p.grad = buf if had is None else had.add_(buf)
        return loss

    def reference_losses(self, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
        """The per-token losses of the base alone (every LoRA branch off, no gradient; the caller puts the model
        in eval mode), as token_losses shapes them, from a replayed forward graph; None: run it eagerly."""
        if dtype == torch.float32:
            return None
        width = batch["input_ids"].shape[1]
        with torch.no_grad(), self.fast.adapters_off():
            batch, key, cu = self._shape(batch, ("reference",))
            if key in self.failed:
                return None
            b, n, _ = key[-3:]
            if ("reference", b, n, cu is None) not in self.warm:  # compiles the no-grad regions for this width
                self.warm.add(("reference", b, n, cu is None))
                return self.fast.token_losses(batch, dtype, self._eager_layout(cu, n))[:, :width]
            graph = self.graphs.get(key)
            if graph is None:
                if len(self.graphs) >= MAX_GRAPHS:
                    return None
                graph = self._capture_or_fail(key, False, dtype)
                if graph is None:
                    return None
                self.graphs[key] = graph
            graph.load(batch, 1, cu)
            graph.graph.replay()
            return graph.losses[:, :width].clone()

    def _shape(self, batch: dict[str, torch.Tensor], kind: tuple) -> tuple[dict, tuple, torch.Tensor | None]:
        """(the batch padded to its graph's width, the graph's key kind + (rows, width, sample capacity), the
        packed rows' cu_seqlens padded to that capacity, or None for rows of one sample each)."""
        b, n = batch["input_ids"].shape
        width = width_bucket(n)  # rows of near lengths (packed rows end where the next sample does not fit)
        # once rows hold several samples (a packed run), every batch of as many rows takes the widest width
        # they have had: a narrower one (a row that one sample fills, the last row of an epoch) would compile
        # the layers and capture again
        if b in self.packed_width or bool((batch["segment_ids"].cpu() > 0).any()):
            width = self.packed_width[b] = max(width, self.packed_width.get(b, 0))
        batch = _pad_width(batch, width)
        self.fast.check_window(batch["position_ids"])
        probe = packed_layout(batch["segment_ids"].cpu(), use_varlen=True, device="cpu")
        if probe.single and self.packed_width.get(b) != width:
            return batch, kind + (b, width, 0), None
        # the longest sample is taken as the row width: an upper bound only sizes the kernel's grid (the
        # extra blocks return at once), and the graph then fits every packing of this many samples. Rows of
        # one whole sample each, at a packed run's width (a truncated sample), go the packed rows' way.
        cu = torch.arange(0, b * width + 1, width, dtype=torch.int32) if probe.single else probe.cu_seqlens
        capacity = _pow2(max(8, len(cu) - 1))
        return batch, kind + (b, width, capacity), torch.cat([cu, cu[-1:].expand(capacity + 1 - len(cu))])

    def _eager_layout(self, cu: torch.Tensor | None, width: int) -> PackedLayout | None:
        return None if cu is None else PackedLayout(False, cu.to(self.device), width, None)

    def _capture_or_fail(self, key: tuple, fresh: bool, dtype: torch.dtype) -> _Graph | None:
        """_capture, or None (logged, and this shape runs without a graph from now on) where it fails."""
        try:
            return self._capture(key, fresh, dtype)
        except Exception as exc:  # an op that cannot be captured: this shape stays eager, the others not
            self.failed[key] = _why(exc)
            if self.fast.stash is not None:
                self.fast.stash.reset()  # its copies in flight were recorded in the failed capture
            log.warning("fast path: CUDA graph capture failed for batch shape %s (%s); this shape runs "
                        "without a graph from now on", key, self.failed[key])
            return None

    def _recover(self, stream: torch.cuda.Stream, graph: torch.cuda.CUDAGraph) -> None:
        """Undo what a failed capture left. torch.cuda.graph's exit stops where ending the capture fails (a CUDA
        error inside it invalidates the capture: an allocation cuDNN made, a host sync), so the capture stream
        stays current (every later kernel would run, and allocate, there), the device and pinned-memory
        allocators keep sending allocations to the graphs' pool (the next capture fails: 'already recording to
        mempool_id'), and the CUDA generators stay held. The device allocator is told to stop and its extra
        reference to the pool is dropped; the pinned-memory allocator has no such call from Python, so later
        graphs get a new pool, and the failed graph, which that allocator still asks about its capture, is kept."""
        torch.cuda.set_stream(stream)
        try:
            torch._C._cuda_endAllocateToPool(self.device.index, self.pool)
        except RuntimeError:  # the capture ended cleanly (an error in Python): nothing is left recording
            return
        torch._C._cuda_releasePool(self.device.index, self.pool)
        self.pool = torch.cuda.graph_pool_handle()
        self.abandoned.append(graph)
        _release_generators()

    def _bind_grads(self) -> None:
        """Point every parameter's .grad at the buffer the graphs add into, keeping what it held."""
        cleared = []
        for p, buf in zip(self.params, self.grads):
            if p.grad is None:
                cleared.append(buf)
            elif p.grad is not buf:
                buf.copy_(p.grad)
            p.grad = buf
        if cleared:
            torch._foreach_zero_(cleared)

    def _capture(self, key: tuple, fresh: bool, dtype: torch.dtype) -> _Graph:
        """Capture a step of shape `key` (its kind first: none for SFT, "preference", "reference"): `fresh`,
        from no gradients (the first graph: its backward allocates the gradient buffers), else adding into the
        buffers, which the caller has bound."""
        kind, (b, n, capacity) = key[:-3], key[-3:]
        graph = _Graph((b, n), self.device, capacity)
        if fresh:
            kept = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()

        stream = torch.cuda.current_stream()
        capturing = graph.graph
        try:
            if not kind:
                with torch.cuda.graph(graph.graph, pool=self.pool):
                    losses = self.fast.token_losses(graph.inputs, dtype, graph.layout)
                    graph.loss = losses.sum() / graph.n_targets
                    graph.loss.backward(inputs=self.params)
            else:
                with torch.cuda.graph(graph.graph, pool=self.pool):
                    graph.losses = self.fast.token_losses(graph.inputs, dtype, graph.layout)
                if kind == ("preference",):
                    # the forward's autograd graph (its saved tensors in the pool) is what this capture runs
                    graph.weights = torch.zeros_like(graph.losses)
                    graph.backward = capturing = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph.backward, pool=self.pool):
                        torch.autograd.backward(graph.losses, graph.weights, inputs=self.params)
        except BaseException:
            self._recover(stream, capturing)
            raise
        finally:
            if fresh:
                made = [p.grad for p in self.params]
                for p, g in zip(self.params, kept):
                    p.grad = g
        if fresh:  # the first graph: self.grads was None
            # a parameter the loss does not reach gets a zero buffer, which no graph writes
            self.grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, made)]
        # drop the captured autograd graph: its gradient-accumulation nodes remember the capture stream, and a
        # later eager step would reuse them (and with them, that stream)
        if graph.loss is not None:
            graph.loss = graph.loss.detach()
        if graph.losses is not None:
            graph.losses = graph.losses.detach()
        log.info("fast path: captured a CUDA graph for batch shape %s (%s)", key,
                 "a reference pass" if kind == ("reference",) else
                 "overwriting the gradients" if fresh else "adding to the gradients")
        return graph
