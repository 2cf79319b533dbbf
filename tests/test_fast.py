"""The fast training path against the plain transformers + PEFT path: per-token losses and LoRA gradients on
packed, padded batches for every architecture (fp32 on CPU: tight), QLoRA with real bitsandbytes 4-bit, the
chunked loss against F.cross_entropy, and (GPU only) the compiled bf16 kernels and varlen attention."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunelab.config.loader import load_config
from tunelab.data.dataset import Sequence, collate, pack
from tunelab.fast.attention import attention, packed_layout
from tunelab.fast.decoder import FastDecoder
from tunelab.fast.loss import IGNORE, chunked_token_losses
from tunelab.fast.support import unsupported_reason
from tunelab.model.load import add_lora, load_model
from tunelab.model.losses import token_losses

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg(model_path, **over):
    values = {**dict(pretrained_model_name_or_path=str(model_path), data_path="builtin:self_cognition",
                     lora_r=8, lora_alpha=16, lora_dropout=0.0), **over}
    return load_config("demo", [f"{k}={v!r}" for k, v in values.items()])[0]


def _batch(vocab: int, lengths_per_row: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows of random samples (and right padding): several segments per row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        samples = []
        for n in lengths:
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            targets = ids[1:] + [IGNORE]
            targets[: n // 3] = [IGNORE] * (n // 3)  # a masked prompt
            samples.append(Sequence(ids, targets, list(range(n)), [0] * n))
        rows += pack(samples, sum(lengths))
    return collate(rows, pad_id=0)


def _lora_model(path, cfg, quantized=False, prepare=True):
    model = load_model(str(path), dtype=torch.float32, bits=4 if quantized else None, device="cpu")
    model = add_lora(model, cfg, quantized=quantized, prepare=prepare)
    torch.manual_seed(1)
    _wake_lora_b(model)
    return model.train()


def _wake_lora_b(model) -> None:
    """PEFT starts B at zero; make the LoRA branch matter."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)


def _losses_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    losses = fn(batch)
    (losses.sum() / (batch["targets"] != IGNORE).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "internlm"])
def test_fast_path_matches_plain_path(arch, tiny_models):
    """Per-token losses (1e-5) and every LoRA gradient (1e-4 relative) equal the plain path's, on rows that
    pack several samples plus padding."""
    cfg = _cfg(tiny_models[arch])
    model = _lora_model(tiny_models[arch], cfg)
    assert unsupported_reason(model) is None
    batch = _batch(model.config.vocab_size, [[40, 25, 30], [60, 20]])
    plain, plain_grads = _losses_and_grads(model, lambda b: token_losses(model, b, torch.float32), batch)
    # every layer recomputed in backward, only the first, none; then recomputed from inputs kept on the host;
    # LoRA as GEMM groups (what runs without dropout), then the compiled regions (with dropout) at p = 0
    for recomputed, offload, lora_gemms in ((-1, False, True), (1, False, True), (0, False, True),
                                            (-1, True, True), (1, True, True), (1, False, False)):
        fast = FastDecoder(model, compile=False, checkpointing=True, checkpoint_layers=recomputed, offload=offload)
        assert fast.lora_gemms
        fast.lora_gemms = lora_gemms
        quick, quick_grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.float32), batch)
        torch.testing.assert_close(quick, plain, atol=1e-5, rtol=0)
        assert plain_grads.keys() == quick_grads.keys() and len(plain_grads) > 0
        for name, g in plain_grads.items():
            torch.testing.assert_close(quick_grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("resident", [0, 1])
def test_offloaded_layers_keep_their_inputs_on_the_host_and_accumulate(tiny_llama, resident, monkeypatch):
    """With offload, the input of each recomputed layer's two halves is in the host stash after forward (the
    first layer's is the embedding output); two micro-batches accumulate the same gradients as without
    offload. Where gate/up outputs go to the host too, the top `resident` layers (decoder.RESIDENT_LAYERS) keep
    their inputs on the device until their backward takes them, with the same gradients."""
    from tunelab.fast import decoder

    monkeypatch.setattr(decoder, "RESIDENT_LAYERS", resident)
    cfg = _cfg(tiny_llama)
    model = _lora_model(tiny_llama, cfg)
    batches = [_batch(model.config.vocab_size, [[40, 25]], seed=s) for s in (0, 1)]

    def accumulated(fast):
        model.zero_grad(set_to_none=True)
        for b in batches:
            (fast.token_losses(b, torch.float32).sum() / 100).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    kept = accumulated(FastDecoder(model, compile=False, checkpoint_layers=-1))
    fast = FastDecoder(model, compile=False, checkpoint_layers=-1, offload=True)
    assert fast.stash is not None and not fast.output_layers
    offloaded = accumulated(fast)
    for name, g in kept.items():
        torch.testing.assert_close(offloaded[name], g, atol=1e-6, rtol=1e-4, msg=name)
    layers = len(fast.layers)  # on the host: two units per layer (attention, MLP), attention's output
    assert fast.stash.resident == set() and fast.resident_layers() == []  # no outputs: no resident layer
    assert sorted(slot for slot, *_ in fast.stash.buffers if slot[1] == "x") == [(u, "x") for u in range(2 * layers)]
    attention = {slot for slot, *_ in fast.stash.buffers if slot[1] != "x"}  # the output and its log-sum-exp
    assert attention == {(u, f"attention{i}") for u in range(0, 2 * layers, 2) for i in (0, 1)}, attention
    assert not fast.stash.prefetched and not fast.stash.outgoing and not fast.stash.on_device
    embedded = model.get_input_embeddings()(batches[1]["input_ids"])
    torch.testing.assert_close(fast.stash.buffers[fast.stash.latest[0, "x"]], embedded)

    # the first layer's gate/up outputs wait on the host too: its MLP half (unit 1) takes them back, fetched
    # in the backward of the units above (the next layer's attention and MLP halves)
    fast.use_host(True, [0])
    assert fast.stash.resident == ({2, 3} if resident else set())  # the top layer's two units
    with_outputs = accumulated(fast)
    for name, g in kept.items():
        torch.testing.assert_close(with_outputs[name], g, atol=1e-6, rtol=1e-4, msg=name)
    sent = {slot[0] for slot, *_ in fast.stash.buffers if slot[1] == "x"}
    assert sent == set(range(2 * (layers - resident))) and not fast.stash.on_device  # the top layer's stay
    outputs = {slot for slot, *_ in fast.stash.buffers if slot[1].startswith("out")}
    assert outputs == {(1, "out0"), (1, "out1")} and fast.stash.fetch_in == {(1, "out0"): 2, (1, "out1"): 3}
    assert not fast.stash.prefetched and not fast.stash.outgoing
    h = fast.norm(fast.stash.buffers[fast.stash.latest[1, "x"]], fast.layers[0].ln2, fast.layers[0].eps)
    gate = fast.layers[0].gate
    gate_out = h @ gate.base.weight.t() + gate.scale * (h @ gate.lora_a.t()) @ gate.lora_b.t()
    torch.testing.assert_close(fast.stash.buffers[fast.stash.latest[1, "out0"]], gate_out, atol=1e-5, rtol=1e-5)


def test_dropout_masks_are_made_again_from_their_seed():
    """A mask depends only on the seed and each element's place: the same seed drops the same elements (what
    a recomputation and backward rely on), another seed others, independently of the first; about p of them,
    the rest scaled as torch's dropout scales them; add_dropped joins a dropped gradient to a total."""
    from tunelab.fast.dropout import add_dropped, dropped

    x = torch.rand(256, 1000) + 1  # no zeros of its own
    first, second = torch.tensor(12345), torch.tensor(12346)
    a, b = dropped(x, first, 0.1), dropped(x, second, 0.1)
    assert torch.equal(dropped(x.clone(), first.clone(), 0.1), a)
    kept_a, kept_b = a != 0, b != 0
    assert abs(kept_a.float().mean().item() - 0.9) < 0.005
    assert abs((kept_a == kept_b).float().mean().item() - 0.82) < 0.01  # independent: 0.9**2 + 0.1**2
    assert abs((kept_a[:-1] == kept_a[1:]).float().mean().item() - 0.82) < 0.01  # rows do not repeat
    assert abs((kept_a[:, :-1] == kept_a[:, 1:]).float().mean().item() - 0.82) < 0.01  # nor columns
    torch.testing.assert_close(a[kept_a], x[kept_a] / 0.9)
    assert abs((dropped(x, first, 0.5) != 0).float().mean().item() - 0.5) < 0.005
    total = torch.randn_like(x)
    torch.testing.assert_close(add_dropped(total, x, first, 0.1), total + a)


class _SeededDropout(torch.nn.Module):
    """Stands in for PEFT's dropout of one projection: the fast path's mask for projection `uid`, from the seeds
    the test draws as the fast path does (`seeds[0]`)."""

    def __init__(self, uid: int, p: float, seeds: list):
        super().__init__()
        self.uid, self.p, self.seeds = uid, p, seeds

    def forward(self, x):
        from tunelab.fast.dropout import dropped
        return dropped(x, self.seeds[0][self.uid], self.p) if self.training else x


def _peft_dropout_with_fast_masks(model, fast) -> list:
    """Give every PEFT dropout module of `model` the mask that `fast` makes for its projection; returns the
    list into which the test puts a forward's seeds (as element 0)."""
    seeds: list = []
    peft_layers = {id(m.base_layer): m for m in model.modules() if hasattr(m, "lora_dropout")}
    for p in (p for L in fast.layers for p in L.projections()):
        m = peft_layers[id(p.base)]
        m.lora_dropout[m.active_adapters[0]] = _SeededDropout(p.uid, p.dropout, seeds)
    return seeds


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_fast_path_dropout_matches_plain_path_with_the_same_masks(tiny_llama, quantized):
    """With lora_dropout the fast path runs as GEMM groups and drops what PEFT's own forward drops when PEFT's
    dropout is given the same masks: per-token losses and LoRA gradients are equal whether the layers keep
    their activations, are recomputed, or are recomputed from inputs on the host (a recomputation that drew
    new masks would not match); with real NF4 weights too (the catalogue's QLoRA uses dropout 0.1). Another
    draw drops other elements; evaluation drops none."""
    from tunelab.fast.dropout import Masks

    cfg = _cfg(tiny_llama, lora_dropout=0.3, algorithm="qlora" if quantized else "lora")
    model = _lora_model(tiny_llama, cfg, quantized=quantized, prepare=not quantized)
    fast = FastDecoder(model, compile=False)
    seeds = _peft_dropout_with_fast_masks(model, fast)
    batch = _batch(model.config.vocab_size, [[40, 25, 30], [60, 20]])
    torch.manual_seed(7)
    seeds[:] = [Masks.draw(fast.n_projections, "cpu")]  # as the fast path draws them, first thing in forward
    plain, plain_grads = _losses_and_grads(model, lambda b: token_losses(model, b, torch.float32), batch)
    for recomputed, offload in ((0, False), (-1, False), (1, False), (-1, True)):
        fast = FastDecoder(model, compile=False, checkpoint_layers=recomputed, offload=offload)
        assert fast.lora_gemms and fast.dropout == 0.3 and (fast.stash is not None) == offload
        torch.manual_seed(7)
        quick, quick_grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.float32), batch)
        torch.testing.assert_close(quick, plain, atol=1e-5, rtol=0)
        for name, g in plain_grads.items():
            torch.testing.assert_close(quick_grads[name], g, atol=1e-6, rtol=1e-4, msg=name)
    torch.manual_seed(8)
    other, _ = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.float32), batch)
    assert (other - plain).abs().max() > 1e-3
    model.eval()
    with torch.no_grad():
        kept = fast.token_losses(batch, torch.float32)
        torch.testing.assert_close(kept, token_losses(model, batch, torch.float32), atol=1e-5, rtol=0)
    assert (kept - plain).abs().max() > 1e-3


def test_compiled_regions_with_lora_dropout_train_the_same_parameters(tiny_llama):
    """A trainable base weight (here a norm) takes the compiled regions, where dropout is torch's own: its
    random state is replayed in recomputation, so the layers keep their inputs on the GPU (no offload)."""
    cfg = _cfg(tiny_llama, lora_dropout=0.1)
    model = _lora_model(tiny_llama, cfg)
    model.get_base_model().model.layers[0].input_layernorm.weight.requires_grad_(True)
    fast = FastDecoder(model, compile=False, offload=True)
    assert not fast.lora_gemms and fast.replays_rng and fast.stash is None
    batch = _batch(model.config.vocab_size, [[50, 30]])
    torch.manual_seed(0)
    _, grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.float32), batch)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    model.eval()  # no dropout: the fast and plain forward agree exactly again
    with torch.no_grad():
        torch.testing.assert_close(fast.token_losses(batch, torch.float32),
                                   token_losses(model.train(False), batch, torch.float32), atol=1e-5, rtol=0)


def test_full_fine_tuning_on_the_fast_path_matches_plain_path(tiny_llama):
    """Trainable base weights and norms (algorithm full with fast_path on) keep the compiled regions, which
    give them their gradients: the same as the plain path's."""
    model = load_model(str(tiny_llama), dtype=torch.float32, device="cpu").train()
    fast = FastDecoder(model, compile=False)
    assert not fast.lora_gemms
    batch = _batch(model.config.vocab_size, [[40, 30]])
    plain, plain_grads = _losses_and_grads(model, lambda b: token_losses(model, b, torch.float32), batch)
    quick, quick_grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.float32), batch)
    torch.testing.assert_close(quick, plain, atol=1e-5, rtol=0)
    assert any("layers.0.self_attn.q_proj.weight" in name for name in quick_grads)
    for name, g in plain_grads.items():
        torch.testing.assert_close(quick_grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_fast_path_qlora_matches_plain_qlora(tiny_llama):
    """Real bitsandbytes NF4 weights, dequantised inside the fast layer: same losses and LoRA gradients."""
    cfg = _cfg(tiny_llama, algorithm="qlora")
    model = _lora_model(tiny_llama, cfg, quantized=True, prepare=False)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    batch = _batch(model.config.vocab_size, [[30, 30]])
    plain, plain_grads = _losses_and_grads(model, lambda b: token_losses(model, b, torch.float32), batch)
    for keep_scales in (True, False):  # the fp32 block scales kept, or dequantised at every GEMM
        fast = FastDecoder(model, compile=False)
        fast.keep_nf4_scales(keep_scales)
        quick, quick_grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.float32), batch)
        torch.testing.assert_close(quick, plain, atol=1e-5, rtol=0)
        for name, g in plain_grads.items():
            torch.testing.assert_close(quick_grads[name], g, atol=1e-6, rtol=1e-4, msg=name)
        assert all((p.absmax is not None) == keep_scales for p in (fast.layers[0].q, fast.layers[-1].down))


def test_lora_gemm_group_passes_gradcheck():
    """One autograd node for a group of frozen projections with LoRA branches, a bias, a projection without
    LoRA, a prologue and a residual: its gradients for the inputs, the residual and A/B against finite
    differences (float64)."""
    from tunelab.fast.parts import Proj
    from tunelab.fast.lora_gemm import project

    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    d_in, d_out, r, n = 6, 5, 3, 7

    def proj(width: int, bias: bool, scale: float | None) -> Proj:  # scale None: no LoRA branch
        base = torch.nn.Linear(d_in, width, bias=bias).double().requires_grad_(False)
        if scale is None:
            return Proj(base, base.bias)
        return Proj(base, base.bias, rand(r, d_in, grad=True), rand(width, r, grad=True), scale)

    projs = [proj(d_out, False, 0.5), proj(4, True, None), proj(d_out, True, 2.0)]
    ln = rand(d_in)

    def norm(t):  # in float64 throughout (the decoder's RMSNorm computes in float32)
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * ln

    x, residual = rand(2, n, d_in, grad=True), rand(2, n, d_out, grad=True)
    loras = [t for p in projs if p.lora_a is not None for t in (p.lora_a, p.lora_b)]

    def grouped(x, residual, *_):
        return project(norm, (x,), projs, residual=residual)

    def reference(x, residual, *_):
        h = norm(x)
        outs = [p.base(h) + (0 if p.lora_a is None else p.scale * (h @ p.lora_a.t()) @ p.lora_b.t()) for p in projs]
        return (outs[0] + residual, *outs[1:])

    for got, want in zip(grouped(x, residual, *loras), reference(x, residual, *loras)):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(grouped, (x, residual, *loras))
    # without a prologue the first input is the projections' input itself
    a = rand(n, d_in, grad=True)
    got = project(None, (a,), projs[:1])[0]
    torch.testing.assert_close(got, projs[0].base(a) + 0.5 * (a @ projs[0].lora_a.t()) @ projs[0].lora_b.t())
    assert torch.autograd.gradcheck(lambda a, *w: project(None, (a,), projs[:1])[0], (a, *loras[:2]))
    # a prologue with a backward of its own, which writes its gradients over t and dt (SwiGLU, as for down)
    from tunelab.fast.regions import swiglu as _swiglu, swiglu_backward_ as _swiglu_backward_

    gate, up = rand(2, n, d_in, grad=True), rand(2, n, d_in, grad=True)

    def swiglu_group(gate, up, *_):
        return project(_swiglu, (gate, up), projs, prologue_backward=_swiglu_backward_)

    assert torch.autograd.gradcheck(swiglu_group, (gate, up, *loras))
    # with LoRA dropout: each projection's branch reads its own mask of the input, made again in backward
    from tunelab.fast.dropout import Masks, dropped

    masks = Masks(torch.tensor([11, 22, 33]))
    for uid, p in enumerate(projs):
        p.uid, p.dropout = uid, 0.5

    def dropping(x, residual, *_):
        return project(norm, (x,), projs, residual=residual, masks=masks)

    def dropping_reference(x, residual, *_):
        h = norm(x)
        outs = [p.base(h) if p.lora_a is None else
                p.base(h) + p.scale * (dropped(h, masks.seeds[p.uid], 0.5) @ p.lora_a.t()) @ p.lora_b.t()
                for p in projs]
        return (outs[0] + residual, *outs[1:])

    for got, want, undropped in zip(dropping(x, residual, *loras), dropping_reference(x, residual, *loras),
                                    reference(x, residual, *loras)):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(got, undropped)
    assert torch.autograd.gradcheck(dropping, (x, residual, *loras))


@pytest.mark.parametrize("recomputed,offload,o_reads,down_reads,attentions,output_layers", [
    (0, False, 2, 2, 1, []), (-1, False, 3, 2, 2, []), (-1, True, 2, 2, 1, []), (-1, True, 2, 2, 1, [1])])
def test_recomputation_skips_the_gemms_whose_output_it_never_reads(tiny_llama, recomputed, offload, o_reads,
                                                                   down_reads, attentions, output_layers):
    """A recomputed layer runs its forward again only for what backward needs: the down projection's output
    (and, in an offloaded attention half, the o projection's) ends the unit and is not read again, so its
    weight goes through two GEMMs (forward, backward), not three; q's through three whenever the layer is
    recomputed (the first layer's input needs no gradient: one fewer). Counted per layer, on the GEMM-group
    path, as the matrix products that read each weight. An offloaded half fetches its attention output from
    the host instead of running the attention kernel again, and a layer of output_layers its gate and up
    outputs instead of running their GEMMs again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tunelab.fast.offload import ATTENTION_OPS

    model = _lora_model(tiny_llama, _cfg(tiny_llama))
    fast = FastDecoder(model, compile=False, checkpoint_layers=recomputed, offload=offload)
    fast.use_host(offload, output_layers)
    assert fast.lora_gemms and fast.output_layers == output_layers
    watched = {p.base.weight.untyped_storage().data_ptr(): (i, name) for i, L in enumerate(fast.layers)
               for name, p in (("q", L.q), ("o", L.o), ("up", L.up), ("down", L.down))}
    reads: dict[tuple, int] = {}
    gemms = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_}

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name() in ATTENTION_OPS:
                reads["attention"] = reads.get("attention", 0) + 1
            for t in args if func.overloadpacket in gemms else ():
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in watched:
                    key = watched[t.untyped_storage().data_ptr()]
                    reads[key] = reads.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    batch = _batch(model.config.vocab_size, [[40, 25]])
    with CountReads():
        fast.token_losses(batch, torch.float32).sum().backward()
    for i in range(len(fast.layers)):
        assert reads[(i, "o")] == o_reads and reads[(i, "down")] == down_reads, reads
        assert reads[(i, "q")] == (2 if recomputed == 0 else 3) - (i == 0), reads
        assert reads[(i, "up")] == (2 if recomputed == 0 or i in output_layers else 3), reads
    assert reads["attention"] == attentions * len(fast.layers), reads


@pytest.mark.parametrize("trainable_head", [False, True])
def test_chunked_loss_matches_cross_entropy(trainable_head):
    torch.manual_seed(0)
    n, d, v = 37, 16, 101
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, requires_grad=trainable_head)
    targets = torch.randint(0, v, (n,))
    targets[::4] = IGNORE
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE, reduction="none")
    got = chunked_token_losses(hidden, weight, targets, chunk_size=8)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6)  # losses are fp32
    (ref.sum() / 3).backward()
    ref_grads = [hidden.grad.clone()] + ([weight.grad.clone()] if trainable_head else [])
    hidden.grad = None
    weight.grad = None
    (got.sum() / 3).backward()
    got_grads = [hidden.grad] + ([weight.grad] if trainable_head else [])
    for r, g in zip(ref_grads, got_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-6, rtol=1e-6)


def test_packed_attention_reference_is_per_sample_causal():
    torch.manual_seed(0)
    seg = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 4])
    q, k, v = (torch.randn(1, 16, 4, 8) for _ in range(3))
    out = attention(q, k, v, packed_layout(seg, use_varlen=False), scale=8 ** -0.5)
    for lo, hi in ((0, 5), (5, 12)):
        alone = attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], packed_layout(torch.zeros(1, hi - lo), False), 8 ** -0.5)
        torch.testing.assert_close(out[:, lo:hi], alone, atol=1e-6, rtol=0)


def test_train_with_fast_path_on_cpu_matches_plain_run(tiny_llama, tmp_path):
    """`tunelab train` with fast_path='on' (CPU, no compile), with and without offload_checkpoints, logs the
    same per-step losses as 'off'."""
    from conftest import run_losses
    from tunelab.train.loop import train

    losses = {}
    for mode in ("on", "offload", "off"):
        values = dict(pretrained_model_name_or_path=str(tiny_llama), max_steps=6, save_steps=1000, lora_dropout=0.0,
                      gradient_checkpointing=True, fast_path="off" if mode == "off" else "on",
                      evaluation_inputs=["who are you"], evaluation_freq=1000, log_interval=1)
        if mode == "offload":  # else the default, 'auto': off on a CPU
            values["offload_checkpoints"] = True
        cfg, name = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])
        result = train(cfg, name, work_dir=str(tmp_path / mode))
        if mode == "offload":
            assert result.model.tunelab_fast.stash.buffers, "no layer input went to the host"
        elif mode == "on":
            assert cfg.offload_checkpoints == "auto" and result.model.tunelab_fast.stash is None
        losses[mode] = [loss for _, loss in sorted(run_losses(tmp_path / mode).items())]
    assert len(losses["on"]) == 6
    for fast in ("on", "offload"):
        for a, b in zip(losses[fast], losses["off"]):
            assert abs(a - b) < 1e-4 * max(1.0, abs(b)), (fast, losses[fast], losses["off"])


def test_offload_auto_asks_for_a_gpu_and_room_on_the_host(tiny_llama, caplog):
    """offload_checkpoints='auto' turns offload on only on a GPU, and only where the host buffers for the
    largest batch fit in a quarter of the memory available, saying so when they do not. The estimate is what
    a step fills: every recomputed layer's two inputs, attention output and log-sum-exp (single-sample rows,
    whose CPU attention kernel the stash knows; fp32 here)."""
    from tunelab.fast import HOST_SHARE, _use_host

    cfg = _cfg(tiny_llama, batch_size=2, max_length=64)
    model = _lora_model(tiny_llama, cfg)
    fast = FastDecoder(model, compile=False, offload=True)
    fast.token_losses(_single_rows(model.config.vocab_size, 2, 64, 0), torch.float32).sum().backward()
    filled = sum(b.numel() * b.element_size() for b in fast.stash.buffers.values())
    assert {name for (_, name), *_ in fast.stash.buffers} == {"x", "attention0", "attention1"}
    assert filled == fast.host_bytes(2 * 64, element_size=4)
    need = fast.host_bytes(2 * 64)
    room = int(need / HOST_SHARE)
    assert fast.output_layers_for(2 * 64) == []  # a tiny model's link has no room for outputs (see below)
    _use_host(fast, cfg, "cpu", available=100 * room)
    assert fast.stash is None
    _use_host(fast, cfg, "cuda", available=room)
    assert fast.stash is not None
    with caplog.at_level(logging.INFO, logger="tunelab"):
        _use_host(fast, cfg, "cuda", available=room - 8)
    assert fast.stash is None and "offload_checkpoints auto: off" in caplog.text
    explicit = _cfg(tiny_llama, batch_size=2, max_length=64, offload_checkpoints=True)
    _use_host(fast, explicit, "cpu", available=room - 8)  # asked for: on, wherever it runs
    assert fast.stash is not None

    # gate/up outputs go too where output_layers_for picks layers and their buffers fit as well; else the
    # inputs go alone
    fast.output_layers_for = lambda tokens: [0]
    _use_host(fast, cfg, "cuda", available=room)
    assert fast.stash is not None and fast.output_layers == []
    outputs = 2 * 64 * 2 * 2 * model.config.intermediate_size
    _use_host(fast, cfg, "cuda", available=int((need + outputs) / HOST_SHARE))
    # with outputs going, the top layer's units keep their inputs on the GPU (decoder.RESIDENT_LAYERS)
    assert fast.output_layers == [0] and fast.host_bytes(2 * 64) == need + outputs - 2 * 64 * fast._sent_bytes()


def test_output_layers_follow_the_links_room_and_the_peak(monkeypatch):
    """Which layers of a 7B model (built on the meta device: shapes only) send their gate/up outputs to the
    host: as many as the forward's spare link time carries (more at 8,192 tokens than at 2,048, whose forward
    has fewer attention FLOPs per token), spread out, never the top layer, and none whose up output, fetched
    back early, would outweigh the LoRA gradients not yet made (fp32, 20 MB a layer): from layer 9 at 8,192
    tokens (180 MB), none at 32,768. And how many bytes of copies out forward may leave in flight."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(shape)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    fast = FastDecoder(model, compile=False, checkpoint_layers=-1, offload=True)
    at_8k, at_2k = fast.output_layers_for(8192), fast.output_layers_for(2048)
    assert len(at_8k) == 8 and min(at_8k) >= 9 and max(at_8k) < 31, at_8k
    assert len(at_2k) == 5 and min(at_2k) >= 2 and max(at_2k) < 31, at_2k
    for picked in (at_8k, at_2k):
        gaps = [b - a for a, b in zip(picked, picked[1:])]
        assert max(gaps) - min(gaps) <= 1, picked
    assert fast.output_layers_for(32768) == []
    assert fast.output_layers_for(8192, count=99) == list(range(9, 31))
    # forward's copies in flight: at 32k the compute outpaces the link's need, so two layers' inputs and
    # attention outputs (bf16) and log-sum-exps (fp32) bound them, not the link's 3.2 GiB of room
    assert fast.in_flight_bytes(32768, 32768) == 2 * 32768 * (2 * 3 * 4096 + 4 * 32)
    before = fast.host_bytes(8192)
    fast.use_host(True, at_8k)  # eight layers' gate/up outputs go too; the top layer's units stop sending
    assert fast.host_bytes(8192) - before == 8 * 8192 * 2 * 11008 * 2 - 8192 * fast._sent_bytes()
    # with gate/up outputs going too, the link is the slower: what it moves in two layers' forward
    assert abs(fast.in_flight_bytes(8192, 8192) / 2**30 - 0.55) < 0.01
    assert abs(fast.in_flight_bytes(2048, 2048) / 2**30 - 0.12) < 0.01
    assert FastDecoder(model, compile=False, checkpoint_layers=0, offload=True).output_layers_for(8192) == []
    # where gate/up outputs go, the top recomputed layer keeps its inputs on the GPU (decoder.RESIDENT_LAYERS);
    # never more than are recomputed; at 32k, with no outputs to send, none does
    from tunelab.fast import decoder

    assert fast.resident_layers() == [31] and fast.stash.resident == {62, 63}
    fast.use_host(True, fast.output_layers_for(32768))
    assert fast.resident_layers() == [] and fast.stash.resident == set()
    monkeypatch.setattr(decoder, "RESIDENT_LAYERS", 3)
    two = FastDecoder(model, compile=False, checkpoint_layers=2, offload=True)
    assert two.resident_layers(outputs=True) == [0, 1] and two.resident_layers() == []


# -- GPU: compiled bf16 kernels and varlen attention against the eager reference ----------------------------

def _gpu_lora_model_and_batch(path, seed: int, dropout: float = 0.0):
    """A bf16 LoRA model on the GPU (B non-zero) and a packed, padded batch there."""
    model = load_model(str(path), dtype=torch.bfloat16, device="cuda")
    model = add_lora(model, _cfg(path, lora_dropout=dropout), quantized=False).train()
    _wake_lora_b(model)
    batch = _batch(model.config.vocab_size, [[200, 150, 100], [300, 100]], seed=seed)
    return model, {k: t.cuda() for k, t in batch.items()}


@GPU
def test_gpu_compiled_layer_matches_eager_bf16(tiny_llama):
    model, batch = _gpu_lora_model_and_batch(tiny_llama, seed=3)
    eager = FastDecoder(model, compile=False)
    compiled = FastDecoder(model, compile=True)
    ref, ref_grads = _losses_and_grads(model, lambda b: eager.token_losses(b, torch.bfloat16), batch)
    got, got_grads = _losses_and_grads(model, lambda b: compiled.token_losses(b, torch.bfloat16), batch)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    for name, g in ref_grads.items():
        assert torch.nn.functional.cosine_similarity(got_grads[name].flatten().float(),
                                                     g.flatten().float(), dim=0) > 0.99, name


@GPU
def test_gpu_fast_path_matches_plain_path_bf16(tiny_llama):
    model, batch = _gpu_lora_model_and_batch(tiny_llama, seed=4)
    plain, plain_grads = _losses_and_grads(model, lambda b: token_losses(model, b, torch.bfloat16), batch)
    fast = FastDecoder(model, compile=True)
    for lora_gemms in (True, False):  # LoRA as GEMM groups, then in the compiled regions
        fast.lora_gemms = lora_gemms
        quick, quick_grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.bfloat16), batch)
        assert abs(quick.sum().item() - plain.sum().item()) / plain.sum().item() < 1e-2
        for name, g in plain_grads.items():
            assert torch.nn.functional.cosine_similarity(quick_grads[name].flatten().float(),
                                                         g.flatten().float(), dim=0) > 0.99, name


@GPU
def test_gpu_compiled_dropout_matches_plain_path_with_the_same_masks(tiny_llama):
    """The compiled dropout kernel makes the very masks of the eager function (integer hashing: bit for bit),
    and the compiled fast path with dropout, its layers recomputed from inputs on the host, matches PEFT's
    forward given the same masks, in bf16."""
    from tunelab.fast.dropout import Masks, dropped

    model, batch = _gpu_lora_model_and_batch(tiny_llama, seed=4, dropout=0.2)
    fast = FastDecoder(model, compile=True, offload=True)
    assert fast.lora_gemms and fast.stash is not None
    x, seed = torch.randn(777, 301, device="cuda", dtype=torch.bfloat16), torch.tensor(987654, device="cuda")
    assert torch.equal(fast.dropped(x, seed, 0.2), dropped(x, seed, 0.2))
    seeds = _peft_dropout_with_fast_masks(model, fast)
    torch.manual_seed(3)
    seeds[:] = [Masks.draw(fast.n_projections, "cuda")]
    plain, plain_grads = _losses_and_grads(model, lambda b: token_losses(model, b, torch.bfloat16), batch)
    for _ in range(2):  # the first run compiles
        torch.manual_seed(3)
        quick, quick_grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.bfloat16), batch)
    assert abs(quick.sum().item() - plain.sum().item()) / plain.sum().item() < 1e-2
    for name, g in plain_grads.items():
        assert torch.nn.functional.cosine_similarity(quick_grads[name].flatten().float(),
                                                     g.flatten().float(), dim=0) > 0.99, name


@GPU
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_gpu_varlen_attention_matches_masked_reference(kv_heads):
    from tunelab.fast import attention as attn_mod
    if attn_mod.VARLEN is None:
        pytest.skip("this PyTorch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    seg = torch.tensor([[0] * 100 + [1] * 200 + [2] * 180 + [-1] * 32, [0] * 400 + [1] * 112]).cuda()
    q = torch.randn(2, 512, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 512, kv_heads, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 512, kv_heads, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, 512, 8, 64, device="cuda", dtype=torch.bfloat16)
    outs = []
    for varlen in (True, False):
        for t in (q, k, v):
            t.grad = None
        out = attention(q, k, v, packed_layout(seg, use_varlen=varlen), 64 ** -0.5)
        out.backward(grad)
        outs.append((out.float(), q.grad.float(), k.grad.float(), v.grad.float()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


@GPU
def test_gpu_chunked_loss_bf16():
    torch.manual_seed(0)
    hidden = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32000, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    targets = torch.randint(0, 32000, (4096,), device="cuda")
    targets[:100] = IGNORE
    ref = F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=IGNORE, reduction="none")
    ref.mean().backward()
    ref_grad, hidden.grad = hidden.grad.clone(), None
    from tunelab.fast.loss import chunk_losses_and_grad
    for elementwise in (chunk_losses_and_grad, torch.compile(chunk_losses_and_grad)):  # eager, and as the fast path
        got = chunked_token_losses(hidden, weight, targets, chunk_size=1000, elementwise=elementwise)
        got.mean().backward()
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(hidden.grad.float(), ref_grad.float(), atol=1e-3, rtol=5e-2)
        hidden.grad = None


def _single_rows(vocab: int, rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Rows of one sample each, no padding (the fixed-shape case of a benchmark or pack_to_max_length)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full((rows, 1), IGNORE)], dim=1)
    return {"input_ids": ids, "targets": targets, "position_ids": torch.arange(length).expand(rows, -1).clone(),
            "segment_ids": torch.zeros(rows, length, dtype=torch.long)}


@GPU
@pytest.mark.parametrize("recomputed,offload,dropout", [(-1, False, 0.0), (0, False, 0.0), (-1, True, 0.0),
                                                       (-1, True, 0.1), (-1, "outputs", 0.1)])
def test_gpu_cuda_graph_steps_match_eager_steps(tiny_llama, recomputed, offload, dropout):
    """A replayed graph gives the eager step's loss and LoRA gradients for new inputs of the same shape
    (single rows, and packed rows of the same width whose layouts differ but share a bucket: the first of each
    attention kind runs eagerly, later ones are captured when first met; packed rows are padded to the width
    of the single rows' graph), and adds into the gradients already there (gradient accumulation). With LoRA
    dropout a replay draws its masks' seeds from the generator as the eager step does: seeded alike, they
    drop the same elements (of the same layout: a mask follows the flat index, so the eager step is given
    the rows as the graph pads them). "outputs": the first layer's gate/up outputs wait on the host too, and
    come back on their own stream inside the graph."""
    from tunelab.fast.graphs import GraphedSteps, _pad_width

    model, _ = _gpu_lora_model_and_batch(tiny_llama, seed=5, dropout=dropout)
    fast = FastDecoder(model, compile=True, checkpoint_layers=recomputed, offload=bool(offload))
    if offload == "outputs":
        fast.use_host(True, [0])
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = GraphedSteps(fast, params)
    vocab = model.config.vocab_size
    cases = {"single": [_single_rows(vocab, 2, 512, seed) for seed in range(4)],  # a width bucket: no padding
             "packed": [_batch(vocab, lengths, seed=seed) for seed, lengths in
                        enumerate([[[200, 150, 100], [300, 100]], [[120, 300, 30], [250, 150]],
                                   [[450], [100, 100, 100, 100]], [[50, 400], [400, 50]]])]}
    if dropout:
        cases["packed"] = [_pad_width(b, 512) for b in cases["packed"]]

    def eager(batch):
        model.zero_grad(set_to_none=True)
        torch.cuda.manual_seed(11)
        loss = fast.token_losses(batch, torch.bfloat16).sum() / 100
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    def close(got, ref, what):
        for g, r in zip(got, ref):
            assert torch.nn.functional.cosine_similarity(g.flatten().float(), r.flatten().float(), dim=0) > 0.999, what
            torch.testing.assert_close(g.norm(), r.norm(), rtol=1e-2, atol=1e-6, msg=what)

    for kind, batches in cases.items():
        assert batches[0]["input_ids"].shape == batches[-1]["input_ids"].shape
        for i, batch in enumerate(batches):
            ref_loss, ref_grads = eager(batch)
            model.zero_grad(set_to_none=True)
            torch.cuda.manual_seed(11)
            loss = graphs.forward_backward(batch, torch.bfloat16, 100)
            # the first batch of a (rows, width) and attention kind runs eagerly (compiling the layers, planning
            # the attention kernel), later ones replay a graph
            assert loss is not None and not graphs.failed, (kind, graphs.failed)
            # single rows' accumulation below captures their accumulating graph before the packed rows run
            assert len(graphs.graphs) == (i > 0) + (2 if kind == "packed" else 0), (kind, i, list(graphs.graphs))
            torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-3, msg=f"{kind} {i}")
            close([p.grad for p in params], ref_grads, f"{kind} {i}")
        # accumulation: the graph adds to what the gradients hold
        ref_loss, ref_grads = eager(batches[1])
        model.zero_grad(set_to_none=True)
        for _ in range(2):
            torch.cuda.manual_seed(11)
            graphs.forward_backward(batches[1], torch.bfloat16, 100)
        close([p.grad / 2 for p in params], ref_grads, f"{kind} accumulated")
    # single rows: the first graph (overwriting the gradients) and its accumulating twin; packed: accumulating
    assert sorted(graphs.graphs) == [(2, 512, 0, False), (2, 512, 0, True), (2, 512, 8, False)], list(graphs.graphs)
    assert not graphs.failed
    if dropout:  # seeded otherwise, a replay drops other elements (in fp32 on the CPU: cosine 0.90)
        model.zero_grad(set_to_none=True)
        torch.cuda.manual_seed(12)
        graphs.forward_backward(batches[1], torch.bfloat16, 100)
        got, ref = (torch.cat([g.flatten().float() for g in grads]) for grads in ([p.grad for p in params], ref_grads))
        assert torch.nn.functional.cosine_similarity(got, ref, dim=0) < 0.99


@GPU
def test_gpu_packed_run_keeps_one_width(tiny_llama):
    """Packed rows of a run all take its widest width: a narrower packed row (the last, partly filled row of an
    epoch) and a row that one truncated sample fills replay the packed graph of that width, with no eager run
    of their own (a new width compiles the layers again: 8 s a width on the 7B shape, bench/RESULTS.md), and
    give the eager step's loss and gradients."""
    from tunelab.fast.graphs import GraphedSteps

    model, _ = _gpu_lora_model_and_batch(tiny_llama, seed=6)
    fast = FastDecoder(model, compile=True, checkpoint_layers=-1)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = GraphedSteps(fast, params)
    vocab = model.config.vocab_size
    full = [_batch(vocab, [[200, 300], [450, 62]], seed=s) for s in range(2)]  # 500 and 512 wide: width 512
    later = [_batch(vocab, [[120, 60], [90]], seed=3),  # 180 wide: its own width would be 256
             _batch(vocab, [[300], [200]], seed=5),  # one sample a row: 300 wide
             _single_rows(vocab, 2, 512, seed=4)]  # a truncated sample fills each row
    for batch in full:
        graphs.forward_backward(batch, torch.bfloat16, 100)
    warm, captured = set(graphs.warm), set(graphs.graphs)
    for batch in later:
        model.zero_grad(set_to_none=True)
        loss = graphs.forward_backward(batch, torch.bfloat16, 100)
        assert graphs.warm == warm and set(graphs.graphs) == captured and not graphs.failed, \
            (graphs.warm, list(graphs.graphs))
        got = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        ref = fast.token_losses(batch, torch.bfloat16).sum() / 100
        ref.backward()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-2, atol=1e-3)
        for g, r in zip(got, [p.grad for p in params]):
            assert torch.nn.functional.cosine_similarity(g.flatten().float(), r.flatten().float(), dim=0) > 0.999
    assert graphs.packed_width == {2: 512} and all(key[1] == 512 for key in graphs.graphs), list(graphs.graphs)


@GPU
def test_gpu_offloaded_inputs_leave_the_device_and_match(tiny_llama, monkeypatch):
    """With offload_checkpoints, what forward leaves on the GPU for backward shrinks by every recomputed
    layer's input, and the loss and LoRA gradients are those of keeping the inputs there. (No layer keeps its
    units' inputs on the GPU here, decoder.RESIDENT_LAYERS = 0: in this two-layer model the top one would
    hold more than plain checkpointing does, its attention output included.)"""
    from tunelab.fast import decoder

    monkeypatch.setattr(decoder, "RESIDENT_LAYERS", 0)
    model, _ = _gpu_lora_model_and_batch(tiny_llama, seed=7)
    rows, length = 4, 2048
    batch = _single_rows(model.config.vocab_size, rows, length, 0)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(fast):
        fast.token_losses(batch, torch.bfloat16).sum().backward()  # compiles; what compiling keeps is not counted
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = fast.token_losses(batch, torch.bfloat16).sum() / 1000
        assert fast.stash is None or not fast.stash.outgoing  # forward waited for its copies out at its end
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        return held, loss.detach(), [p.grad.clone() for p in params]

    held_kept, loss_kept, grads_kept = run(FastDecoder(model, compile=True, checkpoint_layers=-1))
    fast = FastDecoder(model, compile=True, checkpoint_layers=-1, offload=True)
    held_host, loss_host, grads_host = run(fast)
    layer_input = rows * length * model.config.hidden_size * 2
    assert held_kept - held_host >= 0.9 * len(fast.layers) * layer_input, (held_kept, held_host)
    assert all(buf.is_pinned() for buf in fast.stash.buffers.values())
    # the attention kernel's output went to the host as well (the kernel this GPU runs is one it knows)
    names = {name for (_, name), *_ in fast.stash.buffers}
    assert names >= {"x", "attention0", "attention1"}, names
    torch.testing.assert_close(loss_host, loss_kept, rtol=1e-3, atol=1e-3)
    # not bit-equal: an offloaded MLP half starts from the stored bf16 residual sum and takes its norm from
    # that, where the whole layer takes the norm in the kernel that makes the sum (on 2026-12-02, 6.7% of
    # one gradient's elements differed by more than 1e-4 + 1%, at most by 2.4e-4)
    for g, r in zip(grads_host, grads_kept):
        assert torch.nn.functional.cosine_similarity(g.flatten().float(), r.flatten().float(), dim=0) > 0.999
        torch.testing.assert_close(g.norm(), r.norm(), rtol=1e-2, atol=1e-6)

    # the first layer's gate/up outputs too: forward leaves no more on the GPU, and its recomputation takes
    # forward's very outputs back (the GEMMs it skips would make them again from the same input)
    fast.use_host(True, [0])
    held_out, loss_out, grads_out = run(fast)
    assert held_out <= held_host and {(1, "out0"), (1, "out1")} <= {slot for slot, *_ in fast.stash.buffers}
    torch.testing.assert_close(loss_out, loss_host, rtol=1e-4, atol=1e-4)
    # to a bf16 bit or two: the attention's backward sums dQ with atomics (cuDNN), so two backward passes are
    # not bit-equal (on 2026-12-03 one element of 1,024 differed by 1.5e-5, 0.7%)
    for g, r in zip(grads_out, grads_host):
        torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-5)


@GPU
def test_gpu_lean_qlora_graphs_match_eager(tiny_llama):
    """QLoRA in its leanest setting (inputs on the host, NF4 scales dequantised at every GEMM) captured and
    replayed as a CUDA graph: the eager fast path's loss and LoRA gradients, with nothing failing to capture.
    The reference is the same decoder run eagerly. Its loss is detached before the capture, as the training
    loop does: an eager autograd graph still referenced keeps the parameters' gradient-accumulation nodes,
    which remember the default stream, and the captured backward would then have to wait on that stream
    (on 2026-12-02 this test failed so: 'operation would make the legacy stream depend on a capturing
    blocking stream', with PyTorch's warning that the AccumulateGrad node's stream did not match)."""
    from tunelab.fast.graphs import GraphedSteps

    cfg = _cfg(tiny_llama, algorithm="qlora")
    model = add_lora(load_model(str(tiny_llama), dtype=torch.bfloat16, bits=4, device="cuda"), cfg,
                     quantized=True, prepare=False).train()
    _wake_lora_b(model)
    params = [p for p in model.parameters() if p.requires_grad]
    lean = FastDecoder(model, compile=True, offload=True)
    lean.keep_nf4_scales(False)
    reference = lean
    graphs = GraphedSteps(lean, params)
    for seed in range(3):  # eager at the first sight of the shape, then captured, then replayed
        batch = _single_rows(model.config.vocab_size, 2, 512, seed)
        model.zero_grad(set_to_none=True)
        ref_loss = reference.token_losses(batch, torch.bfloat16).sum() / 100
        ref_loss.backward()
        ref_loss = ref_loss.detach()
        ref_grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        loss = graphs.forward_backward(batch, torch.bfloat16, 100)
        assert loss is not None and not graphs.failed, graphs.failed
        torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-3)
        for g, r in zip([p.grad for p in params], ref_grads):
            assert torch.nn.functional.cosine_similarity(g.flatten().float(), r.flatten().float(), dim=0) > 0.999
    assert len(graphs.graphs) == 1 and lean.layers[0].q.absmax is None


@GPU
def test_gpu_failed_capture_leaves_eager_steps_working(tiny_llama):
    """A step that cannot be captured (here: it waits for the GPU, which a capture forbids) is recorded as
    failed, runs eagerly from then on, and leaves the CUDA random generator usable for what follows."""
    from tunelab.fast.graphs import GraphedSteps

    model, _ = _gpu_lora_model_and_batch(tiny_llama, seed=9)
    fast = FastDecoder(model, compile=False)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = GraphedSteps(fast, params)
    plain_losses = fast.token_losses

    def waits_for_the_gpu(*args, **kwargs):
        torch.cuda.synchronize()
        return plain_losses(*args, **kwargs)

    fast.token_losses = waits_for_the_gpu
    batch = _single_rows(model.config.vocab_size, 2, 512, 0)
    assert graphs.forward_backward(batch, torch.bfloat16, 100) is not None  # the eager first sight
    model.zero_grad(set_to_none=True)
    assert graphs.forward_backward(batch, torch.bfloat16, 100) is None
    assert list(graphs.failed) == [(2, 512, 0)] and not graphs.graphs
    assert all(p.grad is None for p in params)  # nothing half-made is left in the gradients
    x = torch.randn(1000, device="cuda")
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    assert 300 < int((dropped == 0).sum()) < 700
    assert graphs.forward_backward(batch, torch.bfloat16, 100) is None  # decided once: no second attempt


def _preference_rows(vocab: int, units_per_row: list[list[tuple[int, int, int]]], seed: int,
                     kto: bool = False) -> list[Sequence]:
    """Rows of DPO pairs, (prompt, chosen, rejected) lengths, packed as tunelab.data.preference packs them (reference
    log-probs 0, to be filled); `kto`: KTO units instead, an answer (desirable in even units) and a mismatched one."""
    from tunelab.data.dataset import join
    from tunelab.data.preference import CHOSEN, MISMATCHED, REJECTED

    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    rows = []
    for units in units_per_row:
        segments = []
        for i, (p, c, r) in enumerate(units):
            prompt = draw(p)
            kinds = ((CHOSEN if i % 2 == 0 else REJECTED, c), (MISMATCHED, r)) if kto else ((CHOSEN, c), (REJECTED, r))
            for kind, n in kinds:
                answer = draw(n)
                ids = prompt + answer
                segments.append(Sequence(ids, [IGNORE] * (p - 1) + answer + [IGNORE], list(range(p + n)),
                                         [0] * (p + n), [kind], [0.0]))
        rows.append(join(segments))
    return rows


@GPU
@pytest.mark.parametrize("objective,offload", [("dpo", True), ("kto", False), ("orpo", True)])
def test_gpu_preference_graphs_match_eager_steps(tiny_llama, objective, offload):
    """A preference step as two replayed graphs (forward; the objective on its per-token losses; backward with
    d loss / d token loss as weights) gives the eager step's loss and LoRA gradients, for packings of the same
    width whose layouts differ, and adds into gradients already there; a reference pass (adapters off, no
    gradient) replays a forward graph and gives the eager pass's per-token losses."""
    from functools import partial

    from tunelab.fast.graphs import GraphedSteps
    from tunelab.model.losses import reference_token_losses
    from tunelab.train.objective import make_objective

    model, _ = _gpu_lora_model_and_batch(tiny_llama, seed=7)
    fast = FastDecoder(model, compile=True, checkpoint_layers=-1, offload=offload)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = GraphedSteps(fast, params)
    vocab = model.config.vocab_size
    # rows 900 to 1,024 tokens wide (width 1,024), of at most 7 segments (capacity 8), in different layouts
    layouts = [[[(100, 150, 120), (60, 40, 200)], [(200, 200, 90)]], [[(300, 100, 90)], [(50, 60, 70), (80, 90, 100)]],
               [[(120, 180, 150), (100, 70, 80)], [(90, 100, 110)]], [[(30, 40, 50)] * 2, [(200, 150, 140)]]]
    cases = [_preference_rows(vocab, rows, seed, kto=objective == "kto") for seed, rows in enumerate(layouts)]
    objective_ = make_objective(_cfg(tiny_llama, objective=objective, pref_beta=0.5))
    for rows in cases:  # the reference log-probs the base gives (made-up ones would saturate the losses)
        objective_.reference(model, rows, len(rows), 0, torch.bfloat16)

    def step(rows, graphed: bool):
        batch = collate(rows, 0)
        objective_.begin([rows])
        loss_of = partial(objective_.loss, batch=batch, rows=rows)
        if graphed:
            return graphs.forward_backward(batch, torch.bfloat16, 0, loss_of)
        loss = loss_of(fast.token_losses(batch, torch.bfloat16))
        loss.backward()
        return loss.detach()

    def close(got, ref, what):
        for g, r in zip(got, ref):
            assert torch.nn.functional.cosine_similarity(g.flatten().float(), r.flatten().float(), dim=0) > 0.999, what
            torch.testing.assert_close(g.norm(), r.norm(), rtol=1e-2, atol=1e-6, msg=what)

    for i, rows in enumerate(cases):
        model.zero_grad(set_to_none=True)
        ref_loss = step(rows, False)
        ref_grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        loss = step(rows, True)
        assert loss is not None and not graphs.failed, graphs.failed
        # the first batch of the width runs eagerly, the second captures the pair of graphs, later ones replay
        assert len(graphs.graphs) == (i > 0), (i, list(graphs.graphs))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-3, msg=f"{objective} {i}")
        close([p.grad for p in params], ref_grads, f"{objective} {i}")
    model.zero_grad(set_to_none=True)
    for _ in range(2):  # accumulation: the second step's graphs add to what the first left
        step(cases[1], False)
    accumulated = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        step(cases[1], True)
    close([p.grad for p in params], accumulated, f"{objective} accumulated")
    assert sorted(k[1:] for k in graphs.graphs) == [(2, 1024, 8, False), (2, 1024, 8, True)], list(graphs.graphs)
    assert all(k[0] == "preference" for k in graphs.graphs)

    # the reference pass: its first width runs eagerly, then one forward graph serves every packing
    model.tunelab_fast, model.tunelab_graphs = fast, graphs
    try:
        for i, rows in enumerate(cases):
            batch = collate(rows, 0)
            got = reference_token_losses(model, batch, torch.bfloat16)
            with torch.no_grad(), fast.adapters_off():
                model.eval()
                ref = fast.token_losses(batch, torch.bfloat16)
                model.train()
            torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2, msg=f"reference {i}")
            assert got.shape == batch["input_ids"].shape and not graphs.failed
            assert (("reference", 2, 1024, 8) in graphs.graphs) == (i > 0)
        assert model.training
    finally:
        del model.tunelab_fast, model.tunelab_graphs


@GPU
def test_gpu_train_dpo_with_cuda_graphs_matches_without(tmp_path):
    """`tunelab train demo_dpo` on the GPU (bf16, fast path) logs the same per-step losses with and without CUDA
    graphs, and the reference pass and the steps replayed graphs."""
    from conftest import run_losses
    from tunelab.train.loop import train

    runs = {}
    for graphs in (True, False):
        cfg, name = load_config("demo_dpo", ["max_steps=6", "save_steps=1000", "log_interval=1",
                                             f"cuda_graphs={graphs}", "evaluation_freq=1000"])
        result = train(cfg, name, work_dir=str(tmp_path / str(graphs)))
        kept = getattr(result.model, "tunelab_graphs", None)
        assert bool(kept) == graphs
        if graphs:
            kinds = {key[0] for key in kept.graphs}
            assert kinds == {"preference", "reference"} and not kept.failed, (list(kept.graphs), kept.failed)
        runs[graphs] = [loss for _, loss in sorted(run_losses(tmp_path / str(graphs)).items())]
    assert len(runs[True]) == 6
    for a, b in zip(runs[True], runs[False]):
        assert abs(a - b) < 2e-2 * max(1.0, abs(b)), runs


@GPU
def test_gpu_train_with_cuda_graphs_matches_without(tiny_llama, tmp_path):
    """`tunelab train` on the GPU (bf16, fast path, compiled) logs the same per-step losses with and without
    CUDA graphs, and the graphs were used."""
    from conftest import run_losses
    from tunelab.train.loop import train

    losses = {}
    for graphs in (True, False):
        values = dict(pretrained_model_name_or_path=str(tiny_llama), max_steps=8, save_steps=1000, lora_dropout=0.0,
                      cuda_graphs=graphs, evaluation_inputs=["who are you"], evaluation_freq=1000, log_interval=1,
                      max_length=256, pack_to_max_length=True)
        cfg, name = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])
        result = train(cfg, name, work_dir=str(tmp_path / str(graphs)))
        assert bool(getattr(result.model, "tunelab_graphs", None)) == graphs
        if graphs:
            assert result.model.tunelab_graphs.graphs, "no graph was captured"
        losses[graphs] = [loss for _, loss in sorted(run_losses(tmp_path / str(graphs)).items())]
    assert len(losses[True]) == 8
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) < 2e-2 * max(1.0, abs(b)), losses


def test_lean_cublas_is_only_for_the_fast_path_on_one_gpu(tiny_llama, monkeypatch):
    """cuBLAS loses its workspace only for LoRA/QLoRA on the fast path on one CUDA device, and never where the
    user chose a workspace (or deterministic algorithms)."""
    from tunelab import fast as fast_mod

    for name in fast_mod.LEAN_CUBLAS:
        monkeypatch.delenv(name, raising=False)
    assert not fast_mod.lean_cublas(_cfg(tiny_llama), "cpu")
    assert not fast_mod.lean_cublas(_cfg(tiny_llama, fast_path="off"), "cuda")
    assert not fast_mod.lean_cublas(_cfg(tiny_llama, algorithm="full"), "cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not fast_mod.lean_cublas(_cfg(tiny_llama), "cuda")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert not fast_mod.lean_cublas(_cfg(tiny_llama), "cuda")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "TORCH_CUBLASLT_UNIFIED_WORKSPACE" not in os.environ


_WORKSPACE_PROBE = """
import sys, os, torch
from tunelab.config.loader import load_config
from tunelab.train.setup import build_model
path = sys.argv[1]
cfg = load_config("demo", [f"pretrained_model_name_or_path={path!r}", "lora_r=8", "lora_dropout=0.0",
                           "cuda_graphs=False"])[0]
model = build_model(cfg, path, "cuda", torch.bfloat16)
a = torch.ones(512, 512, device="cuda", dtype=torch.bfloat16)
out = torch.empty_like(a)
torch.cuda.synchronize()
before = torch.cuda.memory_allocated()
with torch.cuda.stream(torch.cuda.Stream()):  # a stream cuBLAS has not seen: its workspace is made now
    torch.mm(a, a, out=out)
torch.cuda.synchronize()
workspace = torch.cuda.memory_allocated() - before
ids = torch.arange(3, 19, device="cuda")[None]
loss = model(input_ids=ids, labels=ids).loss  # the plain forward: q/k/v with biases, through cuBLASLt
loss.backward()
print(os.environ.get("CUBLAS_WORKSPACE_CONFIG"), workspace, float(loss), float(out[0, 0]))
"""


@GPU
def test_gpu_lean_cublas_takes_no_workspace_and_keeps_bias_gemms(tiny_models):
    """A fresh process that builds a LoRA model for the fast path gives cuBLAS no workspace (a GEMM on a new
    stream allocates nothing), and GEMMs with a bias (Qwen2's q/k/v, through cuBLASLt) still run; a workspace
    the user set is kept."""
    results = {}
    for user in (None, ":4096:8"):
        env = {k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG",
                                                                "TORCH_CUBLASLT_UNIFIED_WORKSPACE")}
        if user:
            env["CUBLAS_WORKSPACE_CONFIG"] = user
        run = subprocess.run([sys.executable, "-c", _WORKSPACE_PROBE, str(tiny_models["qwen2"])], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        setting, workspace, loss, value = run.stdout.split()[-4:]
        assert float(value) == 512.0 and 0 < float(loss) < 100, run.stdout
        results[user] = (setting, int(workspace))
    assert results[None] == (":0:0", 0), results
    assert results[":4096:8"][0] == ":4096:8" and results[":4096:8"][1] >= 4 * 2**20, results


def test_cuda_graphs_are_not_attached_on_cpu(tiny_llama):
    from tunelab import fast as fast_mod

    cfg = _cfg(tiny_llama, fast_path="on")
    model = _lora_model(tiny_llama, cfg)
    fast_mod.attach(model, cfg, "cpu")
    assert model.tunelab_fast is not None and getattr(model, "tunelab_graphs", None) is None


def test_packed_layout_from_cpu_ids_matches_device_layout():
    seg = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 4, [0] * 16])
    layout = packed_layout(seg, use_varlen=True, device="cpu")
    assert layout.cu_seqlens.tolist() == [0, 5, 12, 16, 32] and layout.max_len == 16
    assert packed_layout(torch.zeros(2, 8, dtype=torch.long), use_varlen=True).single


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("lora_gemms", [True, False])
@pytest.mark.slow
def test_compiled_layer_keeps_few_activations_for_backward(tiny_llama, lora_gemms):
    """What a compiled fast layer keeps for backward decides how many layers must be recomputed to fit a card.
    It needs the layer input, q/k/v and the attention output, the mid-layer residual and the gate/up outputs
    (about 11.4 hidden-sized tensors for a Llama MLP of 2.7x) plus LoRA's rank-sized products; the normed
    inputs and the SwiGLU product (4.7 more) must be recomputed, not kept."""
    model = load_model(str(tiny_llama), dtype=torch.bfloat16, device="cpu")
    model = add_lora(model, _cfg(tiny_llama), quantized=False).train()
    fast = FastDecoder(model, compile=True, checkpointing=False)
    fast.lora_gemms = lora_gemms  # LoRA as GEMM groups, or in the compiled regions (as with dropout)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    n, hidden = 256, model.config.hidden_size

    def kept_by_one_layer() -> float:
        kept = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                kept[storage.data_ptr()] = storage.nbytes()
            return t

        x = torch.randn(1, n, hidden, dtype=torch.bfloat16, requires_grad=True)
        cos, sin = fast.core.rotary_emb(x, torch.arange(n)[None])
        layout = packed_layout(torch.zeros(1, n, dtype=torch.long), use_varlen=False)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fast._layer(x, cos.to(x.dtype), sin.to(x.dtype), fast.layers[0], layout, None)
        y.float().sum().backward()  # the compiled backward runs too
        return sum(kept.values()) / (n * hidden * 2)

    kept_by_one_layer()  # compiles
    ratio = model.config.intermediate_size / hidden
    kept = kept_by_one_layer()
    assert kept < 6 + 2 * ratio + 2.0, kept  # 1 (x) + 4 (q, k, v, out) + 1 (mid) + 2 x ratio (g, u) + LoRA


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_compiled_loss_chunk_equals_eager(softcap):
    """The fast path's compiled copy of a chunk's loss and logit gradient (what a GPU runs, reading the bf16 GEMM
    output without an fp32 copy in memory) gives the eager function's losses and hidden-state gradients, with and
    without Gemma 2's logit softcap, over a tail chunk and ignored tokens."""
    from tunelab.fast.loss import chunk_losses_and_grad

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=g).to(torch.bfloat16).requires_grad_()
    weight = (0.2 * torch.randn(1000, 64, generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, 1000, (300,), generator=g)
    targets[:20] = IGNORE
    results = []
    for elementwise in (chunk_losses_and_grad, torch.compile(chunk_losses_and_grad)):
        losses = chunked_token_losses(hidden, weight, targets, chunk_size=128, softcap=softcap, elementwise=elementwise)
        losses.sum().backward()
        results.append((losses.detach(), hidden.grad))
        hidden.grad = None
    (eager, eager_grad), (compiled, compiled_grad) = results
    assert bool((eager[:20] == 0).all()) and float(eager[20:].min()) > 0
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_grad.float(), eager_grad.float(), atol=1e-4, rtol=1e-2)


def test_loss_chunks_are_sized_by_vocabulary():
    """A chunk's fp32 logits stay within CHUNK_BYTES (no smaller than 256 tokens, no larger than 4,096), and a
    default-chunked loss equals a one-chunk loss."""
    from tunelab.fast.loss import CHUNK_BYTES, chunk_tokens

    assert chunk_tokens(32000) == 1024 and chunk_tokens(151936) == 256 and chunk_tokens(512) == 4096
    for vocab in (1000, 32000, 92544):
        n = chunk_tokens(vocab)
        assert n * vocab * 4 <= CHUNK_BYTES or n == 256
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3000, 16, generator=g)
    weight = torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (3000,), generator=g)
    torch.testing.assert_close(chunked_token_losses(hidden, weight, targets),
                               chunked_token_losses(hidden, weight, targets, chunk_size=3000))


_NF4_CASES = [((128, 96), True), ((128, 96), False), ((33, 64), True), ((512, 1376), True), ((300, 70), False),
              ((7, 9), True)]


def _nf4_check(device: str) -> list[str]:
    """tunelab.fast.nf4 against bitsandbytes on fresh random weights, on `device`: both levels of scales in
    the kernel, and fp32 scales given. Returns what differed (empty when all matched). Triton's CPU
    interpreter (3.6) rounds fp32 -> bf16 toward zero where a GPU rounds to nearest even, so on the CPU bf16
    may also equal the fp32 result truncated; fp32 output must match exactly everywhere."""
    import bitsandbytes.functional as bnbf

    from tunelab.fast import nf4

    wrong = []
    g = torch.Generator().manual_seed(0)
    for shape, nested in _NF4_CASES:
        w = (torch.randn(shape, generator=g) * 3).to(torch.bfloat16).to(device)
        packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested, blocksize=64)
        scales = (bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float() if nested else qs.absmax
        # bitsandbytes' arithmetic in fp32: the high nibble first, one scale per 64 values
        b = packed.flatten().long()
        values = torch.stack([qs.code[b >> 4], qs.code[b & 15]], 1).flatten()[:w.numel()]
        ref32 = (values * scales.repeat_interleave(64)[:w.numel()]).view(shape)
        refs16 = [bnbf.dequantize_4bit(packed, qs)]
        if device == "cpu":  # the interpreter's rounding, see above
            refs16.append((ref32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16))
        offset = float(qs.offset) if nested else None
        for label, got, refs in [
            ("bf16, scales in the kernel", nf4.dequantize(packed, qs, torch.bfloat16, offset=offset), refs16),
            ("bf16, fp32 scales", nf4.dequantize(packed, qs, torch.bfloat16, scales=scales), refs16),
            ("fp32, scales in the kernel", nf4.dequantize(packed, qs, torch.float32, offset=offset), [ref32])]:
            if not any(torch.equal(got, ref) for ref in refs):
                ref = refs[0]
                wrong.append(f"{shape} nested={nested} {label}: max diff {(got.float() - ref.float()).abs().max()}")
    return wrong


@pytest.mark.slow
def test_nf4_kernel_matches_bitsandbytes_in_triton_interpreter(tmp_path):
    """The NF4 kernel's arithmetic on the CPU, under Triton's interpreter (a subprocess: the interpreter is
    chosen when Triton first compiles)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text("import sys\nsys.path.insert(0, %r)\nfrom test_fast import _nf4_check\n"
                      "wrong = _nf4_check('cpu')\nprint('\\n'.join(wrong) or 'ALL MATCH')\n" % str(Path(__file__).parent))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.stdout.strip().endswith("ALL MATCH"), out.stdout[-2000:] + out.stderr[-2000:]


def test_nf4_kernel_falls_back_to_bitsandbytes_where_it_cannot_run(caplog):
    """Where the kernel cannot run (here: CPU tensors with no interpreter), `usable` says no and logs why, so
    the fast path keeps bitsandbytes' dequantisation instead of failing."""
    pytest.importorskip("triton")
    import os

    from tunelab.fast import nf4

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the kernel on the CPU")
    with caplog.at_level("WARNING", logger="tunelab"):
        assert nf4.usable(torch.device("cpu")) is False
    assert "NF4 kernel is not used on cpu" in caplog.text
    assert nf4.usable(torch.device("cpu")) is False  # decided once


@GPU
def test_gpu_swiglu_gradients_are_written_in_place():
    """The down projection's group, compiled as the fast path runs it: with SwiGLU's own backward
    (regions.swiglu_backward_) its backward allocates two (tokens x intermediate) tensors fewer than with
    autograd's, and gives the same gradients (bf16)."""
    from tunelab.fast.regions import swiglu as _swiglu, swiglu_backward_ as _swiglu_backward_
    from tunelab.fast.parts import Proj
    from tunelab.fast.lora_gemm import project

    torch.manual_seed(0)
    tokens, inter, hidden, r = 4096, 2048, 512, 16
    base = torch.nn.Linear(inter, hidden, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    a = (torch.randn(r, inter, device="cuda") * 0.02).requires_grad_()
    b = (torch.randn(hidden, r, device="cuda") * 0.02).requires_grad_()
    proj = Proj(base, None, a, b, 0.25)
    swiglu, backward_ = torch.compile(_swiglu), torch.compile(_swiglu_backward_)
    weights = torch.randn(tokens, hidden, device="cuda")
    results = {}
    for own in (True, False):
        g, u = (torch.randn(tokens, inter, generator=torch.Generator("cuda").manual_seed(seed), device="cuda")
                .bfloat16().requires_grad_() for seed in (1, 2))  # the same values for both ways
        for _ in range(2):  # the first compiles
            a.grad = b.grad = g.grad = u.grad = None
            y = project(swiglu, (g, u), [proj], prologue_backward=backward_ if own else None)[0]
            loss = (y.float() * weights).sum()
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss.backward()
            torch.cuda.synchronize()
        results[own] = (torch.cuda.max_memory_allocated() - start, [t.grad.float() for t in (g, u, a, b)])
        del y, loss
    size = tokens * inter * 2
    assert results[True][0] + 1.5 * size <= results[False][0], (results[True][0] / size, results[False][0] / size)
    for got, want in zip(results[True][1], results[False][1]):
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@GPU
def test_gpu_nf4_kernel_matches_bitsandbytes_bit_for_bit():
    pytest.importorskip("triton")
    from tunelab.fast import nf4

    assert _nf4_check("cuda") == []
    assert nf4.usable(torch.device("cuda", torch.cuda.current_device()))
