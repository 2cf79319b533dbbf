"""The fast training path (GPU): fused, compiled, padding-free, chunked-loss forward over the model's own
parameters. `use_fast_path` decides; `attach` builds it (and its CUDA graphs); train.token_losses and
step.forward_backward use them when attached."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("tunelab")


def _asked_for(cfg, device: str) -> bool:
    """Whether the config and the device ask for the fast path in this process ('auto': LoRA/QLoRA on CUDA),
    whatever the model."""
    if cfg.fast_path == "off":
        return False
    return cfg.fast_path == "on" or (device.startswith("cuda") and cfg.algorithm in ("lora", "qlora"))


def use_fast_path(cfg, device: str, model, engine: str = "single") -> bool:
    """Whether the fast path runs: the config and the device ask for it ('auto': LoRA/QLoRA on CUDA), the
    engine is one process or DDP, and the (not yet LoRA-wrapped) model is one it supports. Decided before LoRA
    is added, because the plain path needs PEFT's k-bit preparation and transformers' own checkpointing, which
    the fast path does not."""
    from tunelab.fast.support import targets_reason, unsupported_reason

    if not _asked_for(cfg, device):
        return False
    reason = None
    if engine not in ("single", "ddp"):
        # FSDP2 gathers its shards and DeepSpeed ZeRO its partitions in hooks on the model's own forward
        reason = f"the {engine} engine (it needs the model's own forward; LoRA/QLoRA over DDP runs the fast path)"
    reason = reason or unsupported_reason(model)
    if reason is None and cfg.algorithm in ("lora", "qlora"):
        reason = targets_reason(model, cfg.lora_target_modules)
    if reason is None and cfg.algorithm in ("lora", "qlora") and getattr(cfg, "use_dora", False):
        # the same words as support._modules_reason, which sees DoRA once PEFT has added it
        reason = "use_dora: DoRA adapters (the fast path computes plain LoRA; the plain path runs DoRA)"
    if reason is not None:
        log.info("fast path off: %s", reason)
    return reason is None


# cuBLAS without a workspace (lean_cublas). With its default one cuBLAS picks GEMM kernels that zero a flag in
# it first: a small memset before nearly every large GEMM, each holding the GPU. Without it the same GEMMs run as
# fast, with no memsets and a lower peak (bench/gemm_gaps.py; figures in bench/RESULTS.md). cuBLASLt (GEMMs with
# a bias) keeps a workspace of its own.
LEAN_CUBLAS = {"CUBLAS_WORKSPACE_CONFIG": ":0:0", "TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0"}


def lean_cublas(cfg, device: str) -> bool:
    """Run cuBLAS without its workspace in this process when it is about to train on the fast path (LoRA or
    QLoRA on one CUDA device): fewer GPU stalls and less memory (see LEAN_CUBLAS). Only while nothing is on
    that GPU yet (the model is about to load), so no cuBLAS workspace exists and every one made later follows
    the setting: a process that used the GPU before keeps one behaviour. Left alone where the user set either
    variable, or asked for deterministic algorithms (which want cuBLAS's workspace). Checked at once with a
    GEMM through cuBLASLt, and put back should that fail. Returns whether this call set it."""
    import torch

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # not measured beside NCCL: left as it is
    if several or not (_asked_for(cfg, device) and device.startswith("cuda") and cfg.algorithm in ("lora", "qlora")) \
            or torch.are_deterministic_algorithms_enabled() or any(name in os.environ for name in LEAN_CUBLAS) \
            or torch.cuda.memory_allocated(device) > 0:
        return False
    os.environ.update(LEAN_CUBLAS)
    try:
        x = torch.ones(4, 16, device=device, dtype=torch.bfloat16)
        torch.nn.functional.linear(x, x[:2].repeat(4, 1), x[0, :8])  # a bias: cuBLASLt
        x @ x.t()
    except RuntimeError as exc:  # cuBLASLt already shares the (now empty) cuBLAS workspace in this process
        for name in LEAN_CUBLAS:
            del os.environ[name]
        log.info("cuBLAS keeps its workspace (%s)", str(exc).splitlines()[0])
        return False
    log.info("cuBLAS runs without its workspace (fast path; set CUBLAS_WORKSPACE_CONFIG to give it one)")
    return True


def attach(model, cfg, device: str, world_size: int = 1) -> None:
    """Give `model` (one that use_fast_path accepted, LoRA added) its fast forward as `model.tunelab_fast`
    and, where they can run, its CUDA graphs as `model.tunelab_graphs`."""
    from tunelab.fast.decoder import FastDecoder

    compiled = device.startswith("cuda") and cfg.fast_compile
    fast = FastDecoder(model, compile=compiled, checkpointing=cfg.gradient_checkpointing,
                       checkpoint_layers=cfg.checkpoint_layers)
    _use_host(fast, cfg, device)
    model.tunelab_fast = fast
    # graphs replay recorded kernels: a recomputed layer's dropout in the compiled regions would not see its
    # first masks again (the GEMM groups' masks come from seeds), and a trainable head (full fine-tuning)
    # needs a GPU sync in the loss; with several processes DDP reduces the gradients in backward hooks, which a
    # captured graph would not call
    graphs = compiled and cfg.cuda_graphs and cfg.algorithm in ("lora", "qlora") and \
        not (fast.replays_rng and fast.checkpointed) and world_size == 1
    if graphs:
        from tunelab.fast.graphs import GraphedSteps
        model.tunelab_graphs = GraphedSteps(fast, [p for p in model.parameters() if p.requires_grad])
        if fast.stash is not None:  # asked to be lean: the NF4 scales too (cheap to redo inside a graph)
            fast.keep_nf4_scales(False)
    if cfg.offload_checkpoints is True and fast.stash is None and fast.checkpointed:
        log.info("offload_checkpoints ignored: lora_dropout > 0 with trainable base weights (the recomputed "
                 "layers keep their inputs)")
    log.info("fast path on (compiled: %s, CUDA graphs: %s, LoRA as %s, layers recomputed in backward: %d of %d%s)",
             compiled, graphs, "GEMM groups" if fast.lora_gemms else "compiled regions", len(fast.checkpointed),
             len(fast.layers), _host_summary(fast) + (f"; {world_size} processes, DDP" if world_size > 1 else ""))


def _host_summary(fast) -> str:
    if fast.stash is None:
        return ""
    if not fast.output_layers:
        return ", inputs on the host"
    return f", inputs on the host, and gate/up outputs of {len(fast.output_layers)} layers"


# The host buffers for the largest batch may take at most this share of the host memory available (other batch
# shapes get buffers of their own, and the data loader and the rest need room): beyond it the gate/up outputs
# stay on the GPU, and 'auto' keeps the inputs there too
HOST_SHARE = 0.25


def _use_host(fast, cfg, device: str, available: int | None = None) -> None:
    """offload_checkpoints: what waits on the host. True: the recomputed layers' inputs; 'auto': the same, on
    a GPU, where their pinned buffers for the largest batch (batch_size x max_length tokens) fit in HOST_SHARE
    of the host memory `available` (default: what is available now). Either way, the gate/up outputs of the
    layers that FastDecoder.output_layers_for picks, where those fit too."""
    wanted = cfg.offload_checkpoints
    if wanted is False or (wanted == "auto" and not device.startswith("cuda")):
        fast.use_host(False)
        return
    if available is None:
        import psutil
        available = psutil.virtual_memory().available
    tokens = cfg.batch_size * cfg.max_length
    fast.use_host(True, fast.output_layers_for(tokens))
    if fast.output_layers and fast.host_bytes(tokens) > HOST_SHARE * available:
        fast.use_host(True)  # the inputs only
    need = fast.host_bytes(tokens)
    if wanted == "auto" and need > HOST_SHARE * available:
        log.info("offload_checkpoints auto: off (the recomputed layers' inputs would take %.1f GiB of pinned host "
                 "memory, %.1f GiB is available); they stay on the GPU", need / 2**30, available / 2**30)
        fast.use_host(False)
