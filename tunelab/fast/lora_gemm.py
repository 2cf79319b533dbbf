"""Frozen projections with their LoRA branches as GEMMs only, forward and backward (the fast path's layers
under LoRA over frozen weights).

Several projections read one input (q/k/v read the normed residual, gate/up the other one). Left to autograd,
each projection's input gradient is a tensor of its own and autograd sums them: two adds of a (tokens x hidden)
tensor for q/k/v, one for gate/up, and the LoRA branches add their own, plus the (tokens x intermediate)
gradients of gate and up, which reach SwiGLU from both the frozen down projection and its LoRA branch: each
sum reads and writes a whole tensor again. Here one autograd node covers a group of projections
and builds the input gradient in one buffer: the first GEMM writes it, every other frozen and LoRA GEMM adds
into it in its epilogue (addmm, beta 1). The LoRA product and a residual are added the same way in forward.

The group's input is made by a `prologue` (the RMSNorm, or SwiGLU for the down projection) that runs inside
the node and again in backward, so the normed tensor and the SwiGLU product are never kept: backward keeps
the prologue's inputs (the residual stream, gate and up, which are kept anyway) and LoRA's rank-sized
products. A prologue may bring its own backward (`prologue_backward`): SwiGLU's writes gate's and up's gradients
over its output and that output's gradient, which autograd would keep beside two new tensors of that size.
Frozen weights only: a trainable base weight, bias or norm weight takes the compiled-region path.
The LoRA branches that read the same undropped input run as one GEMM, their A matrices stacked (see _shared).
LoRA dropout drops each projection's input with a mask made again from a seed (tunelab.fast.dropout) wherever
it is needed: for the rank-sized product, for A's gradient, and for the input gradient's LoRA part.

A recomputed layer runs its forward a second time in backward only for what its nodes save. The group that
ends a recomputed unit (o with the residual, down with the residual) saves its input, not its output, and
nothing reads that output again: marked `tail`, it skips its GEMMs inside `recomputing()` (a third of the
recomputation's frozen FLOPs for a Llama layer) and returns an unfilled output of the right shape, through which autograd sends the
gradient as before. A group whose outputs waited on the host (`kept`) takes them back instead of its GEMMs.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from tunelab.fast.dropout import Masks

_recomputing = 0  # depth of recomputing() contexts


@contextmanager
def recomputing() -> Iterator[None]:
    """Marks a backward's recomputation of forward (a checkpointed or offloaded unit run again): groups made
    with `tail=True` skip their GEMMs inside it."""
    global _recomputing
    _recomputing += 1
    try:
        yield
    finally:
        _recomputing -= 1


def is_recomputing() -> bool:
    """Whether a recomputation (see recomputing()) is running."""
    return _recomputing > 0


class _LoRAGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prologue, prologue_backward, projs, n_inputs: int, residual, tail: bool, masks, kept, *args):
        inputs = args[:n_inputs]  # then the LoRA weights, read from projs (inputs here for their gradients)
        t = inputs[0] if prologue is None else prologue(*inputs)
        lead, flat = t.shape[:-1], t.reshape(-1, t.shape[-1])
        products = _lora_products(flat, projs, masks)
        outputs = []
        skip = tail and _recomputing  # the outputs are not read: only the LoRA products are (by backward)
        for i, p in enumerate(projs):
            if kept is not None and _recomputing:  # forward's outputs, back from the host
                outputs.append(kept.take(i, t.device))
                continue
            if skip:
                outputs.append(t.new_empty(()).expand(*lead, p.base.out_features))
                continue
            w = p.weight(t.dtype)
            add = residual if i == 0 else None  # the residual joins the first projection's output
            if p.bias is not None:
                bias = p.bias.to(t.dtype)
                add = bias if add is None else add + bias
            y = flat @ w.t() if add is None else torch.addmm(add.reshape(-1, w.shape[0]), flat, w.t())
            del w  # a dequantised NF4 weight lives only for its GEMM
            if products[i] is not None:
                y.addmm_(products[i], p.lora_b.to(t.dtype).t(), alpha=p.scale)
            outputs.append(y.view(*lead, -1))
            if kept is not None:
                kept.put(i, outputs[-1])
        ctx.prologue, ctx.prologue_backward, ctx.projs, ctx.n_inputs = prologue, prologue_backward, projs, n_inputs
        ctx.masks = masks
        ctx.has_residual = residual is not None
        ctx.save_for_backward(*inputs, *(x for x in products if x is not None))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        n_in, projs, masks = ctx.n_inputs, ctx.projs, ctx.masks
        input_grad = ctx.needs_input_grad[8: 8 + n_in]
        inputs = [x.detach().requires_grad_(g) for x, g in zip(saved[:n_in], input_grad)]
        products = iter(saved[n_in:])
        with torch.set_grad_enabled(ctx.prologue_backward is None):  # else no autograd graph is needed
            t = inputs[0] if ctx.prologue is None else ctx.prologue(*inputs)
        flat = t.detach().reshape(-1, t.shape[-1])
        wanted = [x for x in inputs if x.requires_grad]  # none for the first layer (a frozen embedding's output)
        dt = None
        dxas: dict[int, torch.Tensor] = {}  # projection -> d(loss)/d(its LoRA product), scaled
        lora_grads: list[torch.Tensor | None] = [None] * (2 * len(projs))
        for i, p in enumerate(projs):
            dy = grads[i].reshape(-1, grads[i].shape[-1])
            if wanted:
                w = p.weight(t.dtype)
                dt = dy @ w if dt is None else dt.addmm_(dy, w)
                del w
            if p.lora_a is None:
                continue
            xa = next(products)
            dxas[i] = (dy @ p.lora_b.to(t.dtype)).mul_(p.scale)
            if p.lora_b.requires_grad:
                lora_grads[2 * i + 1] = (dy.t() @ xa).mul_(p.scale)
        # A's gradients and the LoRA part of the input gradient: one GEMM each for the projections that read the
        # undropped input (their A stacked), one per projection for those that read their own dropped copy
        shared = _shared(projs, masks)
        if shared:
            dxa, (a, ranks) = torch.cat([dxas[i] for i in shared], 1), _stacked_a(projs, shared, t.dtype)
            if any(projs[i].lora_a.requires_grad for i in shared):
                for i, da in zip(shared, (dxa.t() @ flat).split(ranks)):
                    lora_grads[2 * i] = da if projs[i].lora_a.requires_grad else None
            if wanted:
                dt.addmm_(dxa, a)
        for i, dxa in dxas.items():
            if i in shared:
                continue
            p = projs[i]
            if p.lora_a.requires_grad:
                lora_grads[2 * i] = dxa.t() @ _dropped_input(flat, p, masks)
            if wanted and _drops(p, masks):  # dropout's backward: the same mask
                dt = masks.add(dt, dxa @ p.lora_a.to(t.dtype), p.uid, p.dropout)
            elif wanted:
                dt.addmm_(dxa, p.lora_a.to(t.dtype))
        if not wanted:
            input_grads = [None] * n_in
        elif ctx.prologue is None:
            input_grads = [dt.view(t.shape)]
        elif ctx.prologue_backward is not None:  # t and dt are not read again: it may write over them
            input_grads = [g if x.requires_grad else None
                           for g, x in zip(ctx.prologue_backward(*inputs, t, dt.view(t.shape)), inputs)]
        else:
            found = iter(torch.autograd.grad(t, wanted, dt.view(t.shape)))
            input_grads = [next(found) if x.requires_grad else None for x in inputs]
        residual_grad = grads[0] if ctx.has_residual and ctx.needs_input_grad[4] else None
        return (None, None, None, None, residual_grad, None, None, None, *input_grads, *lora_grads)


def _drops(p, masks: Masks | None) -> bool:
    return masks is not None and p.dropout > 0


def _dropped_input(flat: torch.Tensor, p, masks: Masks | None) -> torch.Tensor:
    """What projection p's LoRA branch reads: its input, dropped when this forward drops it."""
    return masks.drop(flat, p.uid, p.dropout) if _drops(p, masks) else flat


def _shared(projs: Sequence, masks: Masks | None) -> list[int]:
    """The projections (two or more, else none) whose LoRA branches read the group's input undropped: their A
    matrices are stacked into one GEMM. Each A product alone is a thin GEMM that reads the whole (tokens x
    hidden) input for little work; stacked, the input is read once (bench/kernel_timings.py --fusion)."""
    shared = [i for i, p in enumerate(projs) if p.lora_a is not None and not _drops(p, masks)]
    return shared if len(shared) > 1 else []


def _stacked_a(projs: Sequence, shared: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """The shared projections' A matrices as one (sum of ranks x in_features) matrix, and their ranks."""
    return torch.cat([projs[i].lora_a for i in shared]).to(dtype), [projs[i].lora_a.shape[0] for i in shared]


def _lora_products(flat: torch.Tensor, projs: Sequence, masks: Masks | None) -> list:
    """Each projection's rank-sized LoRA product drop(t) A^T (None without LoRA), the shared ones from one
    GEMM (views of its output)."""
    shared = _shared(projs, masks)
    products: list[torch.Tensor | None] = [None] * len(projs)
    if shared:
        a, ranks = _stacked_a(projs, shared, flat.dtype)
        for i, xa in zip(shared, (flat @ a.t()).split(ranks, 1)):
            products[i] = xa
    for i, p in enumerate(projs):
        if p.lora_a is not None and products[i] is None:
            products[i] = _dropped_input(flat, p, masks) @ p.lora_a.to(flat.dtype).t()
    return products


def project(prologue: Callable[..., torch.Tensor] | None, inputs: Sequence[torch.Tensor], projs: Sequence,
            residual: torch.Tensor | None = None, tail: bool = False,
            masks: Masks | None = None, kept=None,
            prologue_backward: Callable[..., Sequence[torch.Tensor]] | None = None) -> tuple[torch.Tensor, ...]:
    """For each projection p of `projs` (parts.Proj: frozen weight, optional frozen bias, optional LoRA):
    p(t) = t W^T + bias + scale * (drop(t) A^T) B^T, where t = prologue(*inputs) (or inputs[0] when prologue
    is None) and drop is p's dropout with `masks` (none when masks is None: evaluation, or no dropout);
    `residual`, when given, is added to the first projection's output. Gradients reach the inputs, the
    residual and the LoRA weights. `tail`: the outputs end a recomputed unit, so a recomputation need not
    fill them (see the module's docstring). A recomputation must be given the masks its forward was. `kept`
    (offload.KeptOutputs): forward hands each output i to kept.put(i, y), and a recomputation takes kept.take(i,
    device) instead of running the frozen GEMMs (it still makes the LoRA products, which backward reads).
    `prologue_backward(*inputs, t, dt)`: the gradients for every input of the prologue, given t = prologue(*inputs)
    and its gradient dt, free to write them over t and dt (which backward no longer needs); without it,
    autograd differentiates the prologue."""
    loras = [t for p in projs for t in (p.lora_a, p.lora_b)]
    return _LoRAGroup.apply(prologue, prologue_backward, tuple(projs), len(inputs), residual, tail, masks, kept,
                            *inputs, *loras)
