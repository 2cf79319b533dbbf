"""Preference losses as functions of per-sequence log-probs, and those log-probs from per-token losses.

Each loss returns (per-example losses, chosen rewards, rejected rewards); the rewards are detached and only
logged. Log-probs are sums over an answer's tokens, or per-token averages where the method says so (ipo,
orpo, simpo). The formulas follow the papers as TRL implements them (tests/test_preference.py compares).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from tunelab.data.encode import IGNORE


def sequence_logps(token_losses: torch.Tensor, segment_ids: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the target tokens' log-probs, number of target tokens) of every segment of a batch of packed rows,
    the rows' segments one after another in order. token_losses: per-token cross entropy (0 off target), as
    model.losses.token_losses gives it; segment_ids and targets: the batch's (CPU) tensors, padding -1."""
    counts_per_row = segment_ids.max(dim=1).values + 1
    offsets = torch.cumsum(counts_per_row, 0) - counts_per_row
    total = int(counts_per_row.sum())
    index = torch.where(segment_ids >= 0, segment_ids + offsets[:, None], total).flatten()  # padding: one more bin
    device = token_losses.device
    index = index.to(device)
    sums = torch.zeros(total + 1, device=device).index_add(0, index, -token_losses.flatten().float())
    counts = torch.zeros(total + 1, device=device).index_add(0, index, (targets != IGNORE).flatten().float().to(device))
    return sums[:total], counts[:total]


def _smoothed_sigmoid(margin: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(margin), with the chance `label_smoothing` that the preference is the other way round."""
    return -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0):
    """DPO over summed log-probs (ipo: per-token averages, which the caller passes). kind: sigmoid (DPO;
    conservative DPO with label_smoothing), ipo (IPO's squared loss), hinge (SLiC)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    logits = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = _smoothed_sigmoid(beta * logits, label_smoothing)
    elif kind == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"unknown DPO loss {kind!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, lam: float):
    """ORPO's odds-ratio term, lam * -log sigmoid(log odds(chosen) - log odds(rejected)), over per-token average
    log-probs; the caller adds the chosen answers' next-token loss."""
    chosen, rejected = chosen.float(), rejected.float()
    log_odds = (chosen - rejected) - (_log1m_exp(chosen) - _log1m_exp(rejected))
    return -lam * F.logsigmoid(log_odds), lam * chosen.detach(), lam * rejected.detach()


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0):
    """SimPO over per-token average log-probs: -log sigmoid(beta (chosen - rejected) - gamma), no reference."""
    return (_smoothed_sigmoid(beta * (chosen - rejected) - gamma, label_smoothing),
            beta * chosen.detach(), beta * rejected.detach())


def kto_kl(mismatched: torch.Tensor, ref_mismatched: torch.Tensor, weight: float = 1.0,
           total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """KTO's reference point: the batch's mean log-ratio of mismatched answers, at least 0, as a constant.
    `total`: sums (sum, count) over every process where several share the batch (each its rows, counted with
    its `weight`: 0 for a stand-in), so that each takes the whole batch's mean, as TRL gathers it."""
    ratio = (mismatched - ref_mismatched).detach()
    parts = torch.stack([ratio.sum(), ratio.new_full((), ratio.numel())]) * weight  # no copy from the host
    if total is not None:
        parts = total(parts)
    return (parts[0] / parts[1].clamp(min=1)).clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO over summed log-probs: desirable answers are pushed above the reference point kl, undesirable ones
    below it. Returns (per-sample losses, rewards of the desirable ones, rewards of the undesirable ones)."""
    ratio = logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    rewards = beta * ratio.detach()
    return losses, rewards[desirable], rewards[~desirable]
