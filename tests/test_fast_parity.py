"""The parity matrix: for every family on the fast path's allowlist (tunelab.fast.support.FAMILIES) and every
RoPE type it allows, a tiny random model whose every part matters (norm weights and biases moved off their
initial values; head_dim other than hidden / heads where the family has the field) gives on the fast path the
plain path's per-token losses (1e-5 relative) and LoRA A and B gradients (1e-4 relative), and two samples packed
into one row give what they give apart, which is what the model's own forward gives them. fp32 on the CPU; the
same in bf16 on a GPU, with looser bounds. And the other side: models, config fields and adapters the fast path
was not tested on run the plain path, and the log says why in one line."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
import transformers
from transformers import AutoModelForCausalLM

from test_fast import GPU, _batch, _cfg, _losses_and_grads, _single_rows, _wake_lora_b
from tunelab.config.loader import load_config
from tunelab.data.dataset import Sequence, collate, pack
from tunelab.fast import use_fast_path
from tunelab.fast.decoder import FastDecoder
from tunelab.fast.loss import IGNORE
from tunelab.fast.parts import decoder_core, layers_of
from tunelab.fast.support import FAMILIES, TESTED_ROPE, support, unsupported_reason
from tunelab.model.load import add_lora, attention_implementation
from tunelab.model.tiny import ARCHS, tiny_config
from tunelab.model.losses import token_losses

VOCAB = 512
ATTENTION_CAP = 5.0
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _longrope(partial: float = 1.0) -> dict:
    """Phi-3.5's LongRoPE on the tiny Phi-3 (head_dim 32: transformers checks the factors against hidden / heads),
    switching at 50 positions: the parity rows' batch (positions up to 59) takes the long factors, the packed
    samples (up to 39) the short ones; factors far from 1 so that the wrong set would show."""
    n = int(32 * partial) // 2
    return {"head_dim": 32, "max_position_embeddings": 400, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 50,
        "partial_rotary_factor": partial, "short_factor": [1.0 + 0.2 * i for i in range(n)],
        "long_factor": [3.0 + 0.5 * i for i in range(n)]}}


# name -> (tiny.ARCHS arch, config fields over the tiny one): every family and RoPE type the fast path allows
MATRIX = {
    "llama": ("llama", {"head_dim": 48}),  # Llama 2: GQA (4 heads over 2), head_dim != hidden / heads
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),  # InternLM 1 style, MLP biases too
    "llama3.1": ("llama", {"head_dim": 48, "rope_parameters": LLAMA3_ROPE}),  # Llama 3.1/3.2
    "llama-linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                        "factor": 2.0}}),
    "llama-yarn-rope": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "original_max_position_embeddings": 32}}),
    "qwen2": ("qwen2", {"head_dim": 48}),  # q/k/v biases
    "qwen3": ("qwen3", {"tie_word_embeddings": True}),  # per-head q/k norms, head_dim 48, tied embeddings
    # use_sliding_window: the window on the layers from max_window_layers on (the second)
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}),
    "mistral": ("mistral", {"head_dim": 48, "sliding_window": 24}),  # samples longer than the window
    "ministral": ("ministral", {"head_dim": 48}),  # the window on its first layer only (layer_types)
    "phi3": ("phi3", {"sliding_window": 24, "pad_token_id": 0}),  # fused qkv and gate_up, LoRA on them, window
    "phi3.5": ("phi3", {"pad_token_id": 0, **_longrope()}),  # LongRoPE
    # LongRoPE and RoPE on 3/4 of each head
    "phi4-mini": ("phi3", {"pad_token_id": 0, "tie_word_embeddings": True, **_longrope(0.75)}),
    "internlm3": ("internlm3", {"attention_bias": True, "mlp_bias": True}),  # Llama under its own config class
    "gemma": ("gemma", {"tie_word_embeddings": True}),  # (1 + w) norms, GeGLU, scaled embedding, head_dim 48
    # post-sublayer norms, query_pre_attn_scalar, a sliding layer then a full one; final logits softcapped
    "gemma2": ("gemma2", {"tie_word_embeddings": True, "attn_logit_softcapping": None,
                          "final_logit_softcapping": 5.0}),
    # Gemma 2 as published: attention scores softcapped too, at a cap that bends this tiny model's scores
    # (test_attention_softcapping_matters)
    "gemma2-softcap": ("gemma2", {"tie_word_embeddings": True, "attn_logit_softcapping": ATTENTION_CAP,
                                  "final_logit_softcapping": 5.0}),
    "gemma3": ("gemma3", {"tie_word_embeddings": True}),  # q/k norms too, and a RoPE per layer kind (linear on one)
    # Gemma 3 from 4B on: text and image (Gemma3ForConditionalGeneration), trained on text: its language model
    "gemma3-mm": ("gemma3", {"tie_word_embeddings": True}),
}
MULTIMODAL = {"gemma3-mm"}  # the row's text config inside a text-and-image model (_tiny)


def _text_and_image(text_config: dict):
    """A tiny text-and-image Gemma 3 config around `text_config`: a one-layer vision tower beside it, the image's
    three special tokens at the top of its vocabulary."""
    vocab = text_config["vocab_size"]
    return transformers.Gemma3Config(
        text_config=text_config, mm_tokens_per_image=4, image_token_index=vocab - 1, boi_token_index=vocab - 3,
        eoi_token_index=vocab - 2, tie_word_embeddings=True,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8))


def _move_norms(model, biases: bool = False) -> None:
    """Move the norm weights (and `biases`) off their initial values, so that a path skipping one would not
    match."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or (biases and n.endswith(".bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _tiny(name: str, device: str = "cpu", dtype=torch.float32, lora: LoraConfig | None = None, wrap: bool = True,
          **over):
    """A LoRA-wrapped (`wrap`) tiny random model of MATRIX[name] (B non-zero), its norm weights and biases moved
    off their initial values (ones, zeros) so that a fast path that skipped one would not match."""
    arch, fields = MATRIX[name]
    if not hasattr(transformers, ARCHS[arch][0]):  # InternLM 3 came after transformers 5.17 (the GPU machine's)
        pytest.skip(f"transformers {transformers.__version__} has no {ARCHS[arch][0]}")
    torch.manual_seed(0)
    config = tiny_config(arch, VOCAB, **{**fields, **over})
    if name in MULTIMODAL:
        config = _text_and_image(config.to_dict())
    # the attention tunelab loads such a model with (Gemma 2's softcap: eager; sdpa skipped it in transformers 5.17)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation=attention_implementation(config))
    _move_norms(model, biases=True)
    model = model.to(device, dtype)
    if not wrap:
        return model
    model = get_peft_model(model, lora) if lora is not None else add_lora(model, _cfg("unused"), quantized=False)
    torch.manual_seed(1)
    _wake_lora_b(model)
    return model.train()


def _lora_grads(grads: dict) -> dict:
    found = {n: g for n, g in grads.items() if "lora_A" in n or "lora_B" in n}
    assert any("lora_A" in n for n in found) and any("lora_B" in n for n in found)
    return found


def _assert_same_grads(got: dict, want: dict, bound: float) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        err = (got[name].float() - g.float()).norm() / g.float().norm()
        assert err < bound, (name, float(err))


def test_the_matrix_covers_the_allowlist():
    """The fast path runs only model types and RoPE types that have a parity test here."""
    assert {tiny_config(arch, VOCAB, **fields).model_type for arch, fields in MATRIX.values()} == set(FAMILIES)
    ropes = {fields.get("rope_parameters", {}).get("rope_type", "default") for _, fields in MATRIX.values()}
    assert ropes == set(TESTED_ROPE) | {"longrope"}  # LongRoPE and partial rotary: Phi-3's rows only


def test_longrope_and_partial_rotary_run_the_fast_path_for_phi3_only():
    """Phi-3's attention applies LongRoPE and partial rotary, and its rows test them; a Llama config carrying
    either runs the plain path, saying why."""
    assert unsupported_reason(_tiny("phi4-mini", wrap=False)) is None
    longrope = _longrope()["rope_parameters"]
    why = unsupported_reason(_tiny("llama", wrap=False, head_dim=32, max_position_embeddings=400,
                                   rope_parameters=longrope))
    assert why is not None and "rope type 'longrope'" in why, why
    why = unsupported_reason(_tiny("llama", wrap=False, rope_parameters={"rope_type": "default",
                                                                         "rope_theta": 10000.0,
                                                                         "partial_rotary_factor": 0.5}))
    assert why is not None and "partial_rotary_factor 0.5" in why, why


@pytest.mark.parametrize("name", MATRIX)
def test_fast_path_matches_plain_path(name):
    """Per-token losses within 1e-5 relative and LoRA gradients within 1e-4 relative of the plain path, on rows
    that pack several samples plus padding: with LoRA as GEMM groups (recomputed layers, then inputs on the
    host) and in the compiled regions (no layer recomputed)."""
    model = _tiny(name)
    assert unsupported_reason(model) is None
    batch = _batch(VOCAB, [[40, 25, 30], [60, 20]])
    plain, plain_grads = _losses_and_grads(model, lambda b: token_losses(model, b, torch.float32), batch)
    for recomputed, offload, lora_gemms in ((-1, False, True), (1, True, True), (0, False, False)):
        fast = FastDecoder(model, checkpoint_layers=recomputed, offload=offload)
        fast.lora_gemms = lora_gemms
        quick, quick_grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.float32), batch)
        torch.testing.assert_close(quick, plain, rtol=1e-5, atol=1e-7)
        _assert_same_grads(_lora_grads(quick_grads), _lora_grads(plain_grads), 1e-4)


def test_attention_softcapping_matters():
    """The gemma2-softcap row's cap bends its tiny model's scores: a fast path that skipped it would give losses
    more than 1e-3 relative away from the plain path's, far beyond the row's bound."""
    model = _tiny("gemma2-softcap")
    batch = _batch(VOCAB, [[40, 25, 30], [60, 20]])
    fast = FastDecoder(model)
    for L in fast.layers:
        L.softcap = None
    with torch.no_grad():
        plain, uncapped = token_losses(model, batch, torch.float32), fast.token_losses(batch, torch.float32)
    assert (uncapped - plain).abs().sum() / plain.abs().sum() > 1e-3


def _attention_inputs(rows: int, n: int, dim: int = 48):
    """q (rows, n, 4 heads, dim), k and v (2 kv heads), large enough that a softcap of ATTENTION_CAP bends the
    scores (at the scale 0.2 of the tests)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(rows, n, h, dim, generator=g) for h in (4, 2, 2))
    return 3 * q * (48 / dim) ** 0.5, 3 * k, v


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 24])
def test_flex_attention_masks_equal_the_reference(window):
    """flex_attention with tunelab's score_mod and block masks (what softcapped layers run on CUDA, compiled),
    run eagerly on the CPU (forward only: it has no CPU backward): the reference's output for one sample per
    row and for packed rows flattened into one sequence (samples and padding kept apart, the window within a
    sample), with GQA."""
    from tunelab.fast.attention import attention, flex, packed_layout

    seg = torch.tensor([[0] * 40 + [1] * 25 + [-1] * 15, [0] * 60 + [1] * 20])
    q, k, v = _attention_inputs(2, 80)
    for ids in (torch.zeros_like(seg), seg):
        reference = attention(q, k, v, packed_layout(ids, use_varlen=False), 0.2, window, ATTENTION_CAP)
        assert (reference - attention(q, k, v, packed_layout(ids, use_varlen=False), 0.2, window)).abs().max() > 0.05
        with torch.no_grad():
            got = flex(q, k, v, packed_layout(ids, use_varlen=True), 0.2, window, ATTENTION_CAP, compiled=False)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def _sample(n: int, seed: int) -> Sequence:
    ids = torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    targets = ids[1:] + [IGNORE]
    return Sequence(ids, targets, list(range(n)), [0] * n)


@pytest.mark.parametrize("name", MATRIX)
def test_packed_samples_equal_the_samples_apart(name):
    """Two samples packed into one row give, per token, the losses and LoRA gradients they give run apart, and
    apart the fast path gives what the model's own forward gives (transformers' own masks: Mistral's window)."""
    model = _tiny(name)
    fast = FastDecoder(model)
    samples = [_sample(40, 1), _sample(30, 2)]
    packed = collate(pack(samples, 70), pad_id=0)
    together, together_grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.float32), packed)
    model.zero_grad(set_to_none=True)
    apart = []
    for s in samples:
        losses = fast.token_losses(collate(pack([s], len(s)), pad_id=0), torch.float32)
        (losses.sum() / (packed["targets"] != IGNORE).sum()).backward()
        apart.append(losses.detach()[0])
        with torch.no_grad():  # the model's own forward: no mask, no positions given
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0]
        own = F.cross_entropy(logits, torch.tensor(s.targets), ignore_index=IGNORE, reduction="none")
        torch.testing.assert_close(apart[-1], own, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(together[0], torch.cat(apart), rtol=1e-5, atol=1e-7)
    apart_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    _assert_same_grads(_lora_grads(together_grads), _lora_grads(apart_grads), 1e-4)


@pytest.mark.parametrize("variant", ["rslora", "pissa", "olora"])
def test_lora_variants_that_change_scale_and_init_match_plain_path(variant):
    """rsLoRA (scale alpha / sqrt(r)), PiSSA and OLoRA (initialisation from the base weights, which they change)
    run on the fast path with PEFT's own scale: the plain path's losses and LoRA gradients."""
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
                      use_rslora=variant == "rslora", init_lora_weights=True if variant == "rslora" else variant)
    model = _tiny("qwen3", lora=lora)
    fast = FastDecoder(model)
    assert fast.layers[0].q.scale == pytest.approx(16 / 8 ** 0.5 if variant == "rslora" else 2.0)
    batch = _batch(VOCAB, [[40, 25], [50]])
    plain, plain_grads = _losses_and_grads(model, lambda b: token_losses(model, b, torch.float32), batch)
    quick, quick_grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.float32), batch)
    torch.testing.assert_close(quick, plain, rtol=1e-5, atol=1e-7)
    _assert_same_grads(_lora_grads(quick_grads), _lora_grads(plain_grads), 1e-4)


def _fast_path_log(caplog, model) -> tuple[bool, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunelab"):
        on = use_fast_path(_cfg("unused", fast_path="on"), "cpu", model)
    return on, [r.getMessage() for r in caplog.records if r.getMessage().startswith("fast path")]


def test_models_and_fields_not_tested_run_the_plain_path_and_say_why(caplog):
    """A model type without a parity test (Granite keeps Llama's module names and adds multipliers), and a
    model of a tested type with a field whose value the fast path does not compute (an untested rope type,
    another activation, attention dropout, a layer type other than full and sliding, Gemma 3's attention softcapping,
    bidirectional Gemma 3), take the plain path: the log says why, in one line."""
    from transformers import GraniteConfig

    torch.manual_seed(0)
    granite = AutoModelForCausalLM.from_config(GraniteConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
        logits_scaling=8.0))
    cases = [(granite, "model type 'granite' has no parity test on the fast path"),
             (_tiny("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
              "rope type 'dynamic'"),
             (_tiny("llama", hidden_act="gelu"), "hidden_act 'gelu'"),
             (_tiny("qwen2", attention_dropout=0.1), "attention_dropout 0.1"),
             (_tiny("qwen3", layer_types=["full_attention", "chunked_attention"]),
              "layer types ['chunked_attention']"),
             # attention softcapping has a parity test on Gemma 2 only
             (_tiny("gemma3", attn_logit_softcapping=50.0), "attn_logit_softcapping 50.0"),
             (_tiny("gemma3", use_bidirectional_attention=True), "use_bidirectional_attention True")]
    for model, why in cases:
        on, lines = _fast_path_log(caplog, model)
        assert not on and len(lines) == 1 and why in lines[0] and "\n" not in lines[0], (why, lines)
    assert _fast_path_log(caplog, _tiny("qwen3")) == (True, [])


def test_adapters_the_fast_path_does_not_compute_send_it_aside(caplog):
    """DoRA (a magnitude vector per output) and LoRA on a module the fast path does not read (the output head)
    take the plain path, and the log says which."""
    dora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM")
    on, lines = _fast_path_log(caplog, _tiny("llama", lora=dora))
    assert not on and len(lines) == 1 and "DoRA adapter on" in lines[0] and "plain path runs DoRA" in lines[0]
    head = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    on, lines = _fast_path_log(caplog, _tiny("llama", lora=head))
    assert not on and len(lines) == 1 and "LoRA on" in lines[0] and "lm_head" in lines[0]
    # decided before LoRA is added (train.build_model), from lora_target_modules
    plain = _tiny("phi3", wrap=False)
    for targets, on_fast in (("all-linear", True), (["qkv_proj", "gate_up_proj"], True), (["q_proj"], False),
                             (["qkv_proj", "lm_head"], False), (".*proj", False)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tunelab"):
            assert use_fast_path(_cfg("unused", fast_path="on", lora_target_modules=targets), "cpu", plain) == on_fast
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fast path off")]
        assert len(lines) == (0 if on_fast else 1), (targets, lines)


# -- GPU: the same matrix in bf16, compiled ------------------------------------------------------------------

# Gemma 2's softcapped row once failed on an H100 against a wrong reference (transformers 5.17's sdpa attention, the
# model's default there, skipped the softcap; bench/RESULTS.md); _tiny loads such a model with eager attention
@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("name", list(MATRIX))
def test_gpu_fast_path_matches_plain_path_bf16(name):
    """bf16 on the GPU, compiled, varlen attention over packed rows: the summed loss within 1e-2 relative of
    the plain path's; every LoRA gradient in the plain path's direction (cosine > 0.99), or, where bf16 moves
    the plain path itself that far, at least as near the fp32 plain path's as the bf16 plain path's is (within
    0.005); packed equals apart within bf16."""
    batch = _batch(VOCAB, [[200, 150, 100], [300, 100]], seed=4)
    exact = _tiny(name, device="cuda")
    _, exact_grads = _losses_and_grads(exact, lambda b: token_losses(exact, b, torch.float32), batch)
    model = _tiny(name, device="cuda", dtype=torch.bfloat16)
    plain, plain_grads = _losses_and_grads(model, lambda b: token_losses(model, b, torch.bfloat16), batch)
    fast = FastDecoder(model, compile=True)
    cos = lambda a, b: F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()  # noqa: E731
    for lora_gemms in (True, False):
        fast.lora_gemms = lora_gemms
        quick, quick_grads = _losses_and_grads(model, lambda b: fast.token_losses(b, torch.bfloat16), batch)
        assert abs(quick.sum().item() - plain.sum().item()) / plain.sum().item() < 1e-2
        for n, g in _lora_grads(plain_grads).items():
            to_plain, to_exact, plain_to_exact = cos(quick_grads[n], g), cos(quick_grads[n], exact_grads[n]), \
                cos(g, exact_grads[n])
            assert to_plain > 0.99 or to_exact > plain_to_exact - 0.005, (n, lora_gemms, to_plain, to_exact,
                                                                         plain_to_exact)
    samples = [_sample(200, 1), _sample(150, 2)]
    together = fast.token_losses(collate(pack(samples, 350), pad_id=0), torch.bfloat16)[0]
    apart = torch.cat([fast.token_losses(collate(pack([s], len(s)), pad_id=0), torch.bfloat16)[0] for s in samples])
    assert abs(together.sum().item() - apart.sum().item()) / apart.sum().item() < 1e-2


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("window,dim", [(None, 48), (24, 48), (24, 256)])
def test_gpu_flex_attention_matches_the_reference(window, dim):
    """Softcapped attention on the GPU (compiled flex_attention, bf16) against the fp32 reference on the CPU, for
    one sample a row and for packed rows (padding included), with GQA, at the tiny models' head_dim and Gemma 2's
    (256): the output within bf16, and the gradients of q, k and v in their direction (cosine > 0.999)."""
    from tunelab.fast.attention import attention, packed_layout

    seg = torch.tensor([[0] * 40 + [1] * 25 + [-1] * 15, [0] * 60 + [1] * 20])
    inputs = [t.to(torch.bfloat16).float() for t in _attention_inputs(2, 80, dim)]  # both sides' inputs alike
    weights = torch.randn(2, 80, 4, dim, generator=torch.Generator().manual_seed(4))
    for ids in (torch.zeros_like(seg), seg):
        ref_inputs = [t.clone().requires_grad_() for t in inputs]
        ref = attention(*ref_inputs, packed_layout(ids, use_varlen=False), 0.2, window, ATTENTION_CAP)
        (ref * weights).sum().backward()
        gpu_inputs = [t.to("cuda", torch.bfloat16).requires_grad_() for t in inputs]
        got = attention(*gpu_inputs, packed_layout(ids, use_varlen=True, device="cuda"), 0.2, window, ATTENTION_CAP)
        (got.float() * weights.cuda()).sum().backward()
        close = torch.allclose(got.float().cpu(), ref.detach(), rtol=2e-2, atol=2e-2)
        directions = [F.cosine_similarity(g.grad.float().cpu().flatten(), r.grad.flatten(), dim=0).item()
                      for g, r in zip(gpu_inputs, ref_inputs)]
        assert close and min(directions) > 0.999, \
            ((got.float().cpu() - ref.detach()).abs().max().item(), directions)


@pytest.mark.gpu
@GPU
def test_gpu_softcapped_attention_takes_the_fast_path_with_cuda_graphs(caplog):
    """Gemma 2 as published (attention softcapping, flex_attention on a GPU), compiled: attach captures its steps in
    CUDA graphs (flex_attention's capture once failed, in probes that kept an eager autograd graph alive)."""
    from tunelab import fast as fast_mod

    model = _tiny("gemma2-softcap", device="cuda", dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="tunelab"):
        fast_mod.attach(model, _cfg("unused", offload_checkpoints=False), "cuda")
    assert getattr(model, "tunelab_graphs", None) is not None
    assert any("CUDA graphs: True" in r.getMessage() for r in caplog.records)


def _qwen3_with_moved_norms(source, folder):
    """The tiny Qwen3 with its norm weights moved off their init (q_norm/k_norm included), saved to `folder`."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    _move_norms(model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.mark.gpu
@GPU
def test_gpu_train_qwen3_first_step_loss_equals_the_cpu_plain_path(tiny_models, tmp_path):
    """Issue 28's acceptance 3: `tunelab train` of the tiny Qwen3 with moved norms logs the same first-step loss on
    the GPU's fast path (bf16, compiled, the default for LoRA) as on the CPU's plain path (fp32), within bf16."""
    import os
    import subprocess
    import sys

    from conftest import run_losses

    folder = _qwen3_with_moved_norms(tiny_models["qwen3"], tmp_path / "qwen3")
    options = [f"{k}={v!r}" for k, v in dict(pretrained_model_name_or_path=str(folder), max_steps=2, save_steps=1000,
                                              lora_dropout=0.0, evaluation_freq=1000, log_interval=1).items()]
    first, logs = {}, {}
    for side, env, path in (("gpu", {}, []), ("cpu", {"CUDA_VISIBLE_DEVICES": ""}, ["fast_path='off'"])):
        cp = subprocess.run([sys.executable, "-m", "tunelab", "train", "demo", "--work-dir", str(tmp_path / side),
                             "--cfg-options", *options, *path],
                            capture_output=True, text=True, env=dict(os.environ, **env), timeout=600)
        assert cp.returncode == 0, cp.stderr[-3000:]
        first[side], logs[side] = run_losses(tmp_path / side)[1], cp.stderr
    assert "fast path on" in logs["gpu"] and "fast path on" not in logs["cpu"]
    assert abs(first["gpu"] - first["cpu"]) < 2e-2 * abs(first["cpu"]), first


def _train_on_and_off_log_the_same_losses(folder, tmp_path, steps: int) -> None:
    """`tunelab train` (in process, CPU) of the model in `folder` with fast_path 'on' and 'off', each in its own
    work dir under tmp_path: 'on' takes the fast path, 'off' does not, and they log the same per-step losses."""
    from conftest import run_losses
    from tunelab.train.loop import train

    losses = {}
    for mode in ("on", "off"):
        values = dict(pretrained_model_name_or_path=str(folder), max_steps=steps, save_steps=1000, lora_dropout=0.0,
                      fast_path=mode, evaluation_inputs=["who are you"], evaluation_freq=1000, log_interval=1)
        cfg, name = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])
        result = train(cfg, name, work_dir=str(tmp_path / mode))
        assert (getattr(result.model, "tunelab_fast", None) is not None) == (mode == "on")
        losses[mode] = [loss for _, loss in sorted(run_losses(tmp_path / mode).items())]
    assert len(losses["on"]) == steps
    for a, b in zip(losses["on"], losses["off"]):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b)), losses


def test_train_qwen3_with_moved_norms_logs_the_plain_paths_losses(tiny_models, tmp_path):
    """The issue's case, end to end: `tunelab train` of a tiny Qwen3 whose norm weights are not all ones logs the
    same per-step losses with fast_path 'on' (CPU) as with 'off'; the fast path skipping q_norm/k_norm did not."""
    folder = _qwen3_with_moved_norms(tiny_models["qwen3"], tmp_path / "qwen3")
    _train_on_and_off_log_the_same_losses(folder, tmp_path, steps=4)


def test_text_and_image_models_without_a_row_keep_the_plain_path(monkeypatch):
    """The fast path takes the language model of a text-and-image model only where that model type has a parity
    row (Gemma 3's): with the list emptied, the same model runs the plain path and the log line says why."""
    from tunelab.fast import support as support_module

    monkeypatch.setattr(support_module, "TESTED_TEXT_AND_IMAGE", ())
    why = unsupported_reason(_tiny("gemma3-mm", wrap=False))
    assert why is not None and "language model of a 'gemma3' text-and-image model" in why, why


def test_train_text_and_image_gemma3_on_text(tiny_models, tmp_path):
    """`tunelab train` of a tiny text-and-image Gemma 3 (its norms moved off their init): the fast path (CPU, 'on')
    logs the plain path's losses, rows longer than the sliding window included, and the adapter it writes holds
    LoRA on the language model only, which plain PEFT loads onto the base."""
    import json

    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gemma3"])
    text = AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"]).config.to_dict()
    text["vocab_size"] = len(tokenizer) + 3  # the image's three special tokens on top
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_text_and_image(text))
    _move_norms(model)
    folder = tmp_path / "gemma3-mm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _train_on_and_off_log_the_same_losses(folder, tmp_path, steps=3)
    adapter = tmp_path / "on" / "hf"
    assert "language_model" in json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter)
    adapted = [n for n, m in loaded.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(".language_model.layers." in n for n in adapted), adapted


def test_bench_shapes_take_the_path_their_family_does():
    """bench/speed.py --shape: each published shape builds its family's model, which takes the fast path: Phi-3.5's
    and Phi-4-mini's LongRoPE and partial rotary, and Gemma 2 as published (attention softcapping at 50, on
    flex_attention), with both of its softcaps."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("shape_model", Path(__file__).parents[1] / "bench" / "shape_model.py")
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    for name in ("llama2-7b", "llama3-8b", "qwen2.5-7b", "qwen3-8b", "phi3.5-mini", "phi4-mini", "gemma2-9b"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(shapes.config_of(name))
        computed, why = support(model)
        assert why is None, (name, why)
    assert (computed.attention_softcap, computed.logit_softcap) == (50.0, 30.0)
    layers = layers_of(decoder_core(model), computed)
    assert {L.softcap for L in layers} == {50.0} and {L.window for L in layers} == {4096, None}


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("name", list(MATRIX))
def test_gpu_graphed_steps_match_eager_steps_per_family(name):
    """Every family's graphed steps against its eager ones, every layer recomputed, single rows and packed rows of
    one width, as test_gpu_cuda_graph_steps_match_eager_steps does for Llama in more settings. The last packed
    batch stays within LongRoPE's original context: one replayed graph takes both of its factor sets."""
    from tunelab.fast.graphs import GraphedSteps

    model = _tiny(name, device="cuda", dtype=torch.bfloat16)
    fast = FastDecoder(model, compile=True, checkpoint_layers=-1)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = GraphedSteps(fast, params)
    cases = {"single": [_single_rows(VOCAB, 2, 512, seed) for seed in range(3)],
             "packed": [_batch(VOCAB, lengths, seed=seed) for seed, lengths in
                        enumerate([[[200, 150, 100], [300, 100]], [[120, 300, 30], [250, 150]],
                                   [[450], [100, 100, 100, 100]], [[45] * 4, [45] * 4]])]}

    def eager(batch):  # its loss detached: an eager autograd graph left alive would break the next capture
        model.zero_grad(set_to_none=True)
        loss = fast.token_losses(batch, torch.bfloat16).sum() / 100
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    for kind, batches in cases.items():
        for i, batch in enumerate(batches):
            ref_loss, ref_grads = eager(batch)
            model.zero_grad(set_to_none=True)
            loss = graphs.forward_backward(batch, torch.bfloat16, 100)
            assert loss is not None and not graphs.failed, (kind, i, graphs.failed)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-3, msg=f"{kind} {i}")
            for p, r in zip(params, ref_grads):
                assert F.cosine_similarity(p.grad.flatten().float(), r.flatten().float(), dim=0) > 0.999, (kind, i)
    assert len(graphs.graphs) >= 2, list(graphs.graphs)  # a graph per kind, captured at its second batch


def test_softcapped_attention_takes_the_fast_path_on_a_gpu():
    """Gemma 2 as published (attention softcapping) takes the fast path on a GPU: its bf16 parity row and its
    graphed steps passed on an H100 against Hugging Face's eager attention (bench/RESULTS.md, 2026-12-06)."""
    cfg = _cfg("unused")
    for name in ("gemma2-softcap", "gemma", "gemma3", "llama"):
        assert use_fast_path(cfg, "cuda", _tiny(name, wrap=False)), name


def test_text_and_image_gemma3_trains_its_language_model():
    """Gemma 3 from 4B on is a text-and-image model trained here on text. Its adapters go on the language model
    only ('all-linear' or a list of names; not the vision tower, the projector or the head), the fast path takes
    its language model, and the plain path's packed-row mask keeps the window of its sliding layers, which live
    in the text config: a sample longer than the window gets the model's own losses on both paths."""
    from tunelab.model.load import language_model_targets

    model = _tiny("gemma3-mm")
    assert unsupported_reason(model) is None
    for targets in (None, "all-linear"):
        wrapped = model if targets is None else add_lora(_tiny("gemma3-mm", wrap=False),
                                                       _cfg("unused", lora_target_modules=targets), quantized=False)
        adapted = [n for n, m in wrapped.named_modules() if hasattr(m, "lora_A")]
        assert adapted and all(".language_model.layers." in n for n in adapted), (targets, adapted)
        assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"}, targets
    plain_model = _tiny("gemma", wrap=False)
    assert language_model_targets(plain_model, ["q_proj"]) == ["q_proj"]  # other models: as configured
    sample = _sample(40, 3)  # the tiny text config's window: 24
    batch = collate(pack([sample], 40), pad_id=0)
    with torch.no_grad():
        own = F.cross_entropy(model(input_ids=torch.tensor([sample.input_ids])).logits[0],
                              torch.tensor(sample.targets), ignore_index=IGNORE, reduction="none")
        plain = token_losses(model, batch, torch.float32)[0]
        quick = FastDecoder(model).token_losses(batch, torch.float32)[0]
    torch.testing.assert_close(plain, own, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(quick, own, rtol=1e-5, atol=1e-7)
