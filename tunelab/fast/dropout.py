"""LoRA dropout whose masks are made again from a seed wherever they are needed, never kept.

A layer recomputed in backward (checkpointing, offload_checkpoints) must drop the same elements as its
forward did, and backward needs the same mask twice more: the dropped input makes LoRA A's gradient, and the
input gradient is dropped the same way. PEFT draws every mask from torch's generator. Keeping the masks would
cost a (tokens x in_features) tensor per projection; replaying the generator's state in a recomputation is
not allowed inside a captured CUDA graph, so the fast path used to run dropout without graphs, without
offload and without the GEMM groups. Here each forward draws one seed per projection, on the model's device
(a CUDA graph draws new seeds at every replay, and a resumed run, its random state restored, draws the same
ones), and a mask is a hash of (the element's flat index, the seed), made inside the kernel that applies it
(compiled on the GPU): forward, recomputation and backward make one mask from one integer.
"""
from __future__ import annotations

from typing import Callable

import torch

_LOW32 = 0xFFFFFFFF


def _mix32(index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """A 32-bit hash of (index, seed) in int64 arithmetic: multiply-xorshift rounds whose odd multipliers
    stay below 2**31, so no product of a 32-bit value overflows."""
    h = (index * 0x61C88647 + seed) & _LOW32
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & _LOW32
    h = ((h ^ (h >> 15)) * 0x1B873593) & _LOW32
    return h ^ (h >> 16)


def dropped(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """x with each element zeroed with probability p and the rest scaled by 1 / (1 - p), as torch's dropout
    does; which elements are zeroed depends only on their flat index in x and on `seed` (an int64 tensor)."""
    index = torch.arange(x.numel(), device=x.device).view(x.shape)
    keep = _mix32(index, seed) >= int(p * 2**32)
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


def add_dropped(total: torch.Tensor, g: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """total + dropped(g, seed, p): the input gradient of a dropped input, joined to the gradient so far."""
    return total + dropped(g, seed, p)


class Masks:
    """One forward's LoRA dropout: a seed per projection (`seeds[uid]`) and the functions that apply the masks
    (compiled, on the GPU: the hash, the compare and the scaling are then one kernel)."""

    def __init__(self, seeds: torch.Tensor, drop: Callable = dropped, add: Callable = add_dropped):
        self.seeds, self._drop, self._add = seeds, drop, add

    @staticmethod
    def draw(n: int, device: torch.device | str) -> torch.Tensor:
        """n fresh seeds from torch's generator on `device` (one per projection)."""
        return torch.randint(0, 2**31, (n,), device=device)

    def drop(self, x: torch.Tensor, uid: int, p: float) -> torch.Tensor:
        """Projection `uid`'s dropout of its input x."""
        return self._drop(x, self.seeds[uid], p)

    def add(self, total: torch.Tensor, g: torch.Tensor, uid: int, p: float) -> torch.Tensor:
        """total + projection `uid`'s dropout of the gradient g (dropout's backward is the same mask)."""
        return self._add(total, g, self.seeds[uid], p)
