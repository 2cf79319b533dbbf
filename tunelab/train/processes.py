"""The process group a rank of a torchrun job joins (gloo on CPU, nccl on CUDA), and what a rank needs from
it. Only rank 0 logs, writes run files and checkpoints."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

from tunelab.train.launch import free_port, under_torchrun

log = logging.getLogger("tunelab")

TIMEOUT_VAR = "TUNELAB_DIST_TIMEOUT"     # seconds a collective may wait (default 1800, PyTorch's own)

@dataclass
class Context:
    """Where this process stands: its rank among world_size, the device it trains on."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return self.backend is not None


def setup(need_group: bool = False) -> Context:
    """Join the process group when started by torchrun (or alone when an engine such as DeepSpeed needs a
    group of one); otherwise a single-process context. Ranks other than 0 log errors only."""
    import torch

    cuda = torch.cuda.is_available()
    if not under_torchrun() and not need_group:
        return Context(device="cuda" if cuda else "cpu")
    if not under_torchrun():  # a group of one, e.g. `tunelab train cfg --deepspeed deepspeed_zero2` on one GPU
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    device = "cpu"
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = "nccl" if cuda else "gloo"
    timeout = float(os.environ.get(TIMEOUT_VAR) or 1800)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    if rank != 0:
        log.setLevel(logging.ERROR)
    log.info("process group: %s, %d processes, collective timeout %gs", backend, world, timeout)
    return Context(rank, local, world, device, backend)


def teardown(ctx: Context, finished: bool = False) -> None:
    """Leave the process group. After a run that `finished` on every rank, first wait for the others: a rank
    that left while another still talked to it ended that one with 'terminate called without an active
    exception' (seen once in a loaded test run of FSDP2 on gloo). After an error, leave at once."""
    if ctx.grouped:
        import torch.distributed as dist

        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def all_gather_objects(ctx: Context, value) -> list:
    """Every rank's `value`, in rank order (just [value] for one process)."""
    if not ctx.grouped or ctx.world_size == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


class NullMonitor:
    """RunMonitor's interface for ranks other than 0: they write no logs, scalars or plots."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
