"""What a training step minimises (config `objective`), from the per-token losses of a micro-batch's rows.

SFT: the mean next-token loss over every target token of the optimizer step. Preference objectives: the mean
over the step's units (pairs, or KTO samples) of the method's loss (tunelab.model.preference_losses), from
each answer's log-prob, a segment sum of the per-token losses, so that the fast path's chunked loss and packed
rows serve unchanged. Their figures (reward margin and accuracy, the answers' log-probs) are summed over the
step's micro-batches and handed to the log once per step.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from tunelab.data.dataset import Sequence, collate
from tunelab.data.encode import IGNORE
from tunelab.data.preference import CHOSEN, MISMATCHED, REJECTED
from tunelab.model.losses import reference_token_losses, token_losses
from tunelab.model.preference_losses import (dpo_loss, kto_kl, kto_loss, orpo_loss, sequence_logps,
                                             simpo_loss)

log = logging.getLogger("tunelab")
REFERENCE_QUIET_S = 30  # a reference pass shorter than this logs no progress

# the figures a preference step logs, in the order of Preference.totals
FIGURES = ("chosen_reward", "chosen", "rejected_reward", "rejected", "correct", "logps_chosen", "logps_rejected",
           "units")


class TokenMean:
    """SFT: sum of the per-token losses over the step's target tokens."""
    name = "sft"
    needs_reference = False
    totals = None

    def begin(self, window: list[list[Sequence]]) -> None:
        """A new optimizer step over `window` (every rank's micro-batches)."""
        self.n_targets = sum(s.n_targets for batch in window for s in batch)

    def loss(self, losses: torch.Tensor, batch: dict[str, torch.Tensor], rows: list[Sequence],
             weight: float = 1.0) -> torch.Tensor:
        return losses.sum() / self.n_targets * weight

    def figures(self) -> dict[str, float]:
        return {}


class Preference:
    """dpo, orpo, simpo or kto over rows of units (tunelab.data.preference)."""
    def __init__(self, cfg):
        self.cfg, self.name = cfg, cfg.objective
        self.needs_reference = cfg.objective in ("dpo", "kto")
        # ipo, orpo and simpo compare per-token averages; sigmoid/hinge DPO and KTO whole-answer sums
        self.averaged = cfg.objective in ("orpo", "simpo") or (cfg.objective == "dpo" and cfg.pref_loss == "ipo")
        self.sft_weight = 1.0 if cfg.objective == "orpo" else cfg.pref_ftx  # of the chosen next-token loss
        self.totals: torch.Tensor | None = None
        # several processes (train.engines): a sum over all of them, for KTO's estimate over the whole batch
        self.across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None

    def begin(self, window: list[list[Sequence]]) -> None:
        rows = [s for batch in window for s in batch]
        # a unit is a pair (its chosen answer counts it) or a KTO sample (its answer, whatever the label)
        counted = (CHOSEN, REJECTED) if self.name == "kto" else (CHOSEN,)
        self.units = max(1, sum(k in counted for s in rows for k in s.kinds))
        # ORPO's next-token loss (and pref_ftx's): the mean over the step's chosen answer tokens
        self.chosen_targets = max(1, sum(_targets_of(s, CHOSEN) for s in rows)) if self.sft_weight else 1
        self.totals = None

    def loss(self, losses: torch.Tensor, batch: dict[str, torch.Tensor], rows: list[Sequence],
             weight: float = 1.0) -> torch.Tensor:
        """This micro-batch's share of the step's loss; adds its figures to the step's totals (times `weight`:
        0 for a data-parallel rank's stand-in batch)."""
        sums, counts = sequence_logps(losses, batch["segment_ids"], batch["targets"])
        kinds = [k for s in rows for k in s.kinds]
        device = sums.device
        where = {kind: torch.tensor([i for i, k in enumerate(kinds) if k == kind], dtype=torch.long, device=device)
                 for kind in (CHOSEN, REJECTED, MISMATCHED)}
        logps = sums / counts.clamp(min=1) if self.averaged else sums
        reference = None
        if self.needs_reference:
            reference = torch.tensor([r for s in rows for r in s.reference], device=sums.device)
            if self.averaged:
                reference = reference / counts.clamp(min=1)
        cfg = self.cfg
        if self.name == "kto":
            answers = [i for i, k in enumerate(kinds) if k != MISMATCHED]
            desirable = torch.tensor([kinds[i] == CHOSEN for i in answers], device=device)
            answers = torch.tensor(answers, dtype=torch.long, device=device)
            kl = kto_kl(logps[where[MISMATCHED]], reference[where[MISMATCHED]], weight, self.across_ranks)
            per_unit, chosen_rewards, rejected_rewards = kto_loss(
                logps[answers], reference[answers], desirable, kl, cfg.pref_beta, cfg.kto_desirable_weight,
                cfg.kto_undesirable_weight)
            correct = _right(chosen_rewards, 0) + _right(0, rejected_rewards)
        else:
            chosen, rejected = logps[where[CHOSEN]], logps[where[REJECTED]]
            if self.name == "dpo":
                per_unit, chosen_rewards, rejected_rewards = dpo_loss(
                    chosen, rejected, reference[where[CHOSEN]], reference[where[REJECTED]], cfg.pref_beta,
                    cfg.pref_loss, cfg.pref_label_smoothing)
            elif self.name == "simpo":
                per_unit, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, cfg.pref_beta,
                                                                        cfg.simpo_gamma, cfg.pref_label_smoothing)
            else:
                per_unit, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, cfg.orpo_lambda)
            correct = _right(chosen_rewards, rejected_rewards)
        loss = per_unit.sum() / self.units
        if self.sft_weight:
            loss = loss - self.sft_weight * sums[where[CHOSEN]].sum() / self.chosen_targets
        figures = torch.stack([chosen_rewards.sum(), _count(chosen_rewards), rejected_rewards.sum(),
                               _count(rejected_rewards), correct.float(), sums[where[CHOSEN]].sum().detach(),
                               sums[where[REJECTED]].sum().detach(), _count(per_unit)]) * weight
        self.totals = figures if self.totals is None else self.totals + figures
        return loss * weight

    def figures(self) -> dict[str, float]:
        """The step's figures (one wait for the device): the mean chosen minus the mean rejected reward, the
        share of units whose chosen reward is the higher (KTO: whose reward has its label's sign), the mean
        log-probs of the chosen and the rejected answers (summed over their tokens)."""
        if self.totals is None:
            return {}
        t = dict(zip(FIGURES, self.totals.tolist()))
        self.totals = None
        mean = lambda total, n: total / n if n else 0.0  # noqa: E731
        return {"reward_margin": mean(t["chosen_reward"], t["chosen"]) - mean(t["rejected_reward"], t["rejected"]),
                "reward_accuracy": mean(t["correct"], t["units"]),
                "logps_chosen": mean(t["logps_chosen"], t["chosen"]),
                "logps_rejected": mean(t["logps_rejected"], t["rejected"])}

    def reference(self, model, rows: list[Sequence], batch_size: int, pad_id: int, dtype: torch.dtype) -> None:
        """Fill every row's `reference`: each answer's summed log-prob under the reference model. The longest rows
        go first: with CUDA graphs the first batch then sets the width that every later one, and training's, is
        padded to (fast/graphs.py), so that one graph serves them all. A pass that takes long says how far it
        is at each tenth of the rows (it runs before the first step, which would otherwise be the first sign of
        life)."""
        order = sorted(rows, key=len, reverse=True)
        started, tenth = time.time(), max(1, len(order) // 10)
        for i in range(0, len(order), batch_size):
            if i and i // tenth > (i - batch_size) // tenth and time.time() - started > REFERENCE_QUIET_S:
                log.info("reference log-probs: %d of %d rows (%.0fs)", i, len(order), time.time() - started)
            chunk = order[i:i + batch_size]
            batch = collate(chunk, pad_id)
            sums, _ = sequence_logps(reference_token_losses(model, batch, dtype), batch["segment_ids"],
                                     batch["targets"])
            sums = sums.tolist()
            for row in chunk:
                row.reference, sums = sums[:len(row.kinds)], sums[len(row.kinds):]


def _right(higher, lower) -> torch.Tensor:
    """How many of the comparisons come out the preferred way, a tie counting half (a coin toss): before
    training, when the model is its reference, the accuracy is then 50%, not 0."""
    return ((higher > lower).float() + 0.5 * (higher == lower).float()).sum()


def _count(t: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(t.numel()), device=t.device)


def _targets_of(row: Sequence, kind: int) -> int:
    """Target tokens of the row's segments of `kind`."""
    segment_kind = dict(enumerate(row.kinds))
    return sum(t != IGNORE and segment_kind[s] == kind for t, s in zip(row.targets, row.segment_ids))


def make_objective(cfg):
    return TokenMean() if cfg.objective == "sft" else Preference(cfg)


def evaluate_objective(objective, model, rows: list[Sequence], batch_size: int, pad_id: int,
                       dtype: torch.dtype) -> dict[str, float]:
    """The objective's loss (and figures) over held-out rows, without gradients: {'val_loss': ..., ...}."""
    objective.begin([rows])
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            batch = collate(chunk, pad_id)
            total += float(objective.loss(token_losses(model, batch, dtype), batch, chunk))
    return {"val_loss": total, **{f"val_{k}": v for k, v in objective.figures().items()}}
