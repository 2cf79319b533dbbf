"""How the model trains across processes: alone, PyTorch DDP, FSDP2 (`fully_shard`) or DeepSpeed ZeRO.

Which engine: `--deepspeed` picks DeepSpeed; otherwise one process trains alone, and several use DDP for
LoRA/QLoRA (only the adapter's gradients are reduced) and FSDP2 for full fine-tuning. TUNELAB_PARALLEL=ddp
or =fsdp overrides that choice (e.g. FSDP2 for LoRA on a base too large for one card).

Data parallel, exactly: an optimizer step takes `accumulative_counts` global micro-batches, each the next
`batch_size x world_size` sequences of the epoch's seeded order; rank r trains on sequences
[r*batch_size, (r+1)*batch_size) of each. Every rank divides its summed token loss by the number of target
tokens of the WHOLE step (all ranks; each rank knows the step's sequences, so no communication is needed)
and multiplies by world_size, because the engines average gradients over ranks. The reduced gradient is
therefore the gradient of the single-process loss over the same sequences, and N processes with
batch_size B and accumulative_counts A reproduce the per-step losses of ONE process with batch_size B*N and
accumulative_counts A (or batch_size B and accumulative_counts A*N): the same B*A*N sequences per step,
the same steps per epoch (ceil(sequences / (B*A*N))). Dropout draws differ per rank, so runs with dropout
agree in distribution rather than bit for bit.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from tunelab.data.dataset import collate
from tunelab.errors import UserError
from tunelab.train.objective import make_objective
from tunelab.train.processes import Context
from tunelab.train.step import optimizer_step

log = logging.getLogger("tunelab")


def choose(ctx: Context, cfg, deepspeed: dict | None) -> str:
    """'single', 'ddp', 'fsdp' or 'deepspeed' for this run."""
    if deepspeed is not None:
        return "deepspeed"
    if ctx.world_size == 1:
        return "single"
    wanted = os.environ.get("TUNELAB_PARALLEL", "auto").strip().lower() or "auto"
    if wanted not in ("auto", "ddp", "fsdp"):
        raise UserError(f"TUNELAB_PARALLEL={wanted!r}: expected auto, ddp or fsdp")
    if wanted == "auto":
        return "fsdp" if cfg.algorithm == "full" else "ddp"
    if wanted == "fsdp" and cfg.algorithm == "qlora":
        raise UserError("TUNELAB_PARALLEL=fsdp: sharding a 4-bit QLoRA base with FSDP2 is not supported yet; "
                        "use DDP (the default for QLoRA) or algorithm = 'lora'")
    return wanted


def load_device(kind: str, cfg, device: str, deepspeed: dict | None) -> str:
    """Where build_model puts the weights: on the CPU when the engine will shard them onto the GPU (so a
    model larger than one card can be loaded), else straight onto this rank's device."""
    from tunelab.train.deepspeed_config import zero_stage

    shards = kind == "fsdp" or (kind == "deepspeed" and zero_stage(deepspeed) == 3)
    return "cpu" if shards and cfg.algorithm != "qlora" else device


def wrap(ctx: Context, model, cfg, dtype: torch.dtype, deepspeed: dict | None, work_dir: Path) -> "TrainingEngine":
    """The engine that trains `model` (which is wrapped, sharded or partitioned in place as needed)."""
    kind = choose(ctx, cfg, deepspeed)
    engine = {"single": TrainingEngine, "ddp": DDPEngine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}[kind]
    if kind != "single":
        log.info("parallel: %s over %d processes", kind, ctx.world_size)
    return engine(ctx, model, cfg, dtype, deepspeed, work_dir)


class TrainingEngine:
    """One process: the model as it is. Subclasses change how the step runs and how state is saved."""
    kind = "single"

    def __init__(self, ctx: Context, model, cfg, dtype, deepspeed, work_dir: Path):
        self.ctx, self.module, self.model, self.cfg, self.work_dir = ctx, model, model, cfg, work_dir
        self.objective = make_objective(cfg)  # what the steps minimise (objective.py)

    def make_optimizer(self, params, cfg):
        fused = all(p.is_cuda for p in params) or None  # one kernel for all parameters on a GPU
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                 fused=fused)

    def state(self, model, optimizer, algorithm: str, tag: str | None) -> tuple[dict, dict | None]:
        """(trainable weights, optimizer state) to checkpoint; called on every rank, meaningful on rank 0."""
        from tunelab.model.state import trainable_state

        return trainable_state(model, algorithm), optimizer.state_dict() if optimizer is not None else None

    def load_optimizer(self, model, optimizer, optimizer_state) -> None:
        if _keyed_by_name(optimizer_state):  # saved by an FSDP2 run
            optimizer_state = _by_index(model, optimizer_state)
        optimizer.load_state_dict(optimizer_state)

    def optimizer_step(self, window, optimizer, params, cfg, tokenizer, dtype, step: int,
                       stop: list[int]) -> tuple[float | None, int, float]:
        """One optimizer step (tunelab.train.step.optimizer_step): (loss or None where it was skipped, tokens, seconds).
        `stop` holds a signal caught meanwhile; one process has no one to agree with on it."""
        return optimizer_step(self.model, window, optimizer, params, cfg, tokenizer, dtype, step, self.objective)


class DataParallelEngine(TrainingEngine):
    """Several processes, each training on its share of every micro-batch; subclasses reduce the gradients."""

    def __init__(self, ctx: Context, model, cfg, dtype, deepspeed, work_dir: Path):
        super().__init__(ctx, model, cfg, dtype, deepspeed, work_dir)
        if hasattr(self.objective, "across_ranks"):
            self.objective.across_ranks = _summed_over_ranks

    def sync(self, last: bool):
        """Context for one micro-batch's backward: reduce gradients only on the window's last one."""
        return nullcontext()

    def token_losses(self, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        from tunelab.model.losses import token_losses

        return token_losses(self.model, batch, dtype)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss * self.ctx.world_size).backward()  # the engines average over ranks; undo it

    def apply(self, optimizer, params, max_norm: float) -> bool:
        """Clip and step; False (weights untouched) when the gradient is not finite."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            return False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def optimizer_step(self, window, optimizer, params, cfg, tokenizer, dtype, step: int,
                       stop: list[int]) -> tuple[float | None, int, float]:
        """One optimizer step of several ranks: this rank's share of each micro-batch, then one agreement
        on (loss, any rank non-finite, any rank signalled) so that every rank skips or stops together."""
        t0 = time.time()
        rank, bs = self.ctx.rank, cfg.batch_size
        self.objective.begin(window)
        n_tokens = sum(len(s) for batch in window for s in batch)
        total, bad = 0.0, False
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            mine, weight = batch[rank * bs:(rank + 1) * bs], 1.0
            if not mine:  # the epoch's last micro-batch may not reach every rank: a zero-weight stand-in
                mine, weight = batch[:1], 0.0  # keeps this rank in the collectives
            with self.sync(last):
                batch_tensors = collate(mine, tokenizer.pad_token_id)
                loss = self.objective.loss(self.token_losses(batch_tensors, dtype), batch_tensors, mine, weight)
                finite = bool(torch.isfinite(loss))
                bad |= not finite
                self.backward(loss, last)  # even when not finite: every rank must take part in the reduction
            total += loss.item() if finite else 0.0
        total, bad, signalled = self._agree(total, bad, stop)
        if self.objective.totals is not None:  # the step's figures over every rank's units
            import torch.distributed as dist
            dist.all_reduce(self.objective.totals)
        if signalled and not stop:
            stop.append(signalled)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            return None, n_tokens, time.time() - t0
        if not self.apply(optimizer, params, cfg.max_norm):
            return None, n_tokens, time.time() - t0
        return total, n_tokens, time.time() - t0

    def _agree(self, total: float, bad: bool, stop: list[int]) -> tuple[float, bool, int]:
        import torch.distributed as dist

        mine = torch.tensor([total, float(bad), float(stop[0] if stop else 0)], dtype=torch.float64,
                            device=self.ctx.device)
        every = [torch.zeros_like(mine) for _ in range(self.ctx.world_size)]
        dist.all_gather(every, mine)
        every = torch.stack(every).cpu()
        return float(every[:, 0].sum()), bool(every[:, 1].any()), int(every[:, 2].max())


def _summed_over_ranks(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t


class FastLosses(torch.nn.Module):
    """The fast path's per-token losses as a module's forward: what DDP wraps when the fast path is attached, so
    that DDP's forward prepares its reducer and its hooks reduce the adapter's gradients during backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return self.model.tunelab_fast.token_losses(batch, dtype)


class DDPEngine(DataParallelEngine):
    """PyTorch DistributedDataParallel. Frozen weights (a LoRA/QLoRA base) are left out of DDP's bookkeeping:
    every rank loaded them from the same files, and only trainable gradients are reduced, in DDP's buckets while
    backward still runs. On the fast path DDP wraps FastLosses (the fast forward) instead of the model."""
    kind = "ddp"

    def __init__(self, ctx, model, cfg, dtype, deepspeed, work_dir):
        super().__init__(ctx, model, cfg, dtype, deepspeed, work_dir)
        from torch.nn.parallel import DistributedDataParallel

        self.fast = getattr(model, "tunelab_fast", None) is not None
        wrapped = FastLosses(model) if self.fast else model
        frozen = [n for n, p in wrapped.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in wrapped.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapped, frozen)
        cuda = ctx.device.startswith("cuda")
        self.model = DistributedDataParallel(wrapped, device_ids=[ctx.local_rank] if cuda else None,
                                             broadcast_buffers=False)

    def sync(self, last: bool):
        return nullcontext() if last else self.model.no_sync()

    def token_losses(self, batch, dtype):
        return self.model(batch, dtype) if self.fast else super().token_losses(batch, dtype)


def _keyed_by_name(optimizer_state: dict) -> bool:
    """FSDP2's full optimizer state names parameters; torch's own numbers them."""
    return any(isinstance(p, str) for g in optimizer_state["param_groups"] for p in g["params"])


def _trainable_names(model) -> list[str]:
    """Parameter names in the order the optimizer was given them (setup.setup_optimizer: the trainable ones, in order)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _by_name(model, state: dict) -> dict:
    names = _trainable_names(model)
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}


def _by_index(model, state: dict) -> dict:
    index = {n: i for i, n in enumerate(_trainable_names(model))}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]}


def _block_classes(model) -> set[str]:
    """Names of the model's transformer-block classes (Hugging Face lists them in _no_split_modules)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


class FSDPEngine(DataParallelEngine):
    """PyTorch FSDP2: each transformer block, then the whole model, is a `fully_shard` unit; every rank holds
    1/world_size of the weights, gradients and optimizer state. Checkpoints hold full (gathered) state,
    so they resume with any number of processes and `convert pth_to_hf` reads them as they are."""
    kind = "fsdp"

    def __init__(self, ctx, model, cfg, dtype, deepspeed, work_dir):
        super().__init__(ctx, model, cfg, dtype, deepspeed, work_dir)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        cuda = ctx.device.startswith("cuda")
        mesh = init_device_mesh("cuda" if cuda else "cpu", (ctx.world_size,))
        mixed = cuda and dtype != torch.float32  # compute in bf16/fp16, keep fp32 weights and reduce in fp32
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if mixed else \
            MixedPrecisionPolicy()
        blocks = _block_classes(model)
        if not blocks:
            log.warning("warning: the model names no transformer-block class; FSDP2 shards it as one unit")
        for module in list(model.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)

    def state(self, model, optimizer, algorithm, tag):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered onto rank 0's CPU
        full = get_model_state_dict(model, options=options)
        optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
        if not self.ctx.is_main:
            return {}, None
        if algorithm != "full":
            from peft import get_peft_model_state_dict

            full = get_peft_model_state_dict(model, state_dict=full)
        return full, optim  # already fresh CPU copies

    def load_optimizer(self, model, optimizer, optimizer_state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not _keyed_by_name(optimizer_state):  # saved by a DDP or one-process run
            optimizer_state = _by_name(model, optimizer_state)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))


class DeepSpeedEngine(DataParallelEngine):
    """DeepSpeed ZeRO 1/2/3 (with CPU offload), configured by tunelab.train.deepspeed_config. DeepSpeed averages
    gradients over ranks and divides the loss by its accumulation steps; the loss is scaled back so that the
    step's gradient equals the single-process one. The engine writes its sharded optimizer state beside each
    checkpoint (work_dir/deepspeed/<checkpoint name>/); the .pth keeps the gathered trainable weights."""
    kind = "deepspeed"

    def __init__(self, ctx, model, cfg, dtype, deepspeed, work_dir):
        super().__init__(ctx, model, cfg, dtype, deepspeed, work_dir)
        from tunelab.train.deepspeed_config import reconcile, require_deepspeed

        require_deepspeed()
        self.config, warnings = reconcile(deepspeed, cfg, ctx.world_size, dtype)
        for line in warnings:
            log.warning(line)

    def make_optimizer(self, params, cfg):
        import deepspeed

        from tunelab.train.deepspeed_config import offloads_optimizer

        optimizer = None
        if offloads_optimizer(self.config):
            try:  # DeepSpeed's CPU Adam is many times faster than torch's on offloaded states
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer = DeepSpeedCPUAdam(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                             weight_decay=cfg.weight_decay, adamw_mode=True)
            except Exception as exc:  # noqa: BLE001 - the op is compiled on first use and may fail
                log.warning("warning: DeepSpeedCPUAdam unavailable (%s); using torch AdamW on the CPU", exc)
        optimizer = optimizer or super().make_optimizer(params, cfg)
        self.model, _, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=self.config)
        return optimizer  # the schedule sets this optimizer's lr; the engine steps it

    def backward(self, loss, last):
        gas = self.config["gradient_accumulation_steps"]
        self.model.set_gradient_accumulation_boundary(last)  # an epoch's last window may be shorter
        self.model.backward(loss * self.ctx.world_size * gas)
        self.model.step()  # clips (gradient_clipping) and steps only at the boundary

    def apply(self, optimizer, params, max_norm):
        return True  # done by the engine in backward()

    def state(self, model, optimizer, algorithm, tag):
        from tunelab.train.deepspeed_config import zero_stage
        from tunelab.model.state import trainable_state

        if optimizer is not None and tag:
            folder = self.work_dir / "deepspeed"
            self.model.save_checkpoint(str(folder), tag=tag)
            if self.ctx.is_main:  # engine states of checkpoints that save_total_limit pruned
                for old in folder.iterdir():
                    if old.is_dir() and old.name != tag and not (self.work_dir / old.name).exists():
                        shutil.rmtree(old, ignore_errors=True)
        if zero_stage(self.config) == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                weights = trainable_state(model, algorithm) if self.ctx.is_main else {}
        else:
            weights = trainable_state(model, algorithm) if self.ctx.is_main else {}
        return weights, ({"deepspeed": tag, "world_size": self.ctx.world_size} if optimizer is not None else None)

    def load_optimizer(self, model, optimizer, optimizer_state):
        tag = (optimizer_state or {}).get("deepspeed")
        folder = self.work_dir / "deepspeed"
        if not tag or optimizer_state.get("world_size") != self.ctx.world_size or not (folder / tag).is_dir():
            log.warning("warning: no DeepSpeed optimizer state for this checkpoint and number of processes; "
                        "AdamW restarts from zero (weights, schedule and data position are restored)")
            return
        self.model.load_checkpoint(str(folder), tag=tag, load_module_strict=False, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
