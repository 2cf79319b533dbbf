"""Evaluation during training: greedy answers to the config's evaluation_inputs, and the validation loss."""
from __future__ import annotations

import logging

import torch

from tunelab.config.schema import Config
from tunelab.data.dataset import Sequence, collate
from tunelab.data.encode import PromptFormat
from tunelab.data.formats import Turn
from tunelab.model.generate import Sampling, generate
from tunelab.model.losses import token_losses
from tunelab.train.objective import evaluate_objective

log = logging.getLogger("tunelab")


def evaluate(model, tokenizer, fmt: PromptFormat, cfg: Config, step: int, monitor, val: list[Sequence],
             dtype, objective=None) -> None:
    """Answer cfg.evaluation_inputs greedily (to the log and eval_answers.jsonl); measure the validation loss
    (a preference objective's, with its reward margin and accuracy on the held-out pairs)."""
    answers = []
    for question in cfg.evaluation_inputs:
        ids, _ = fmt.encode([Turn(question, "")], open_last=True)
        answer = generate(model, tokenizer, ids, fmt.stop_words,
                          Sampling(max_new_tokens=cfg.evaluation_max_new_tokens, temperature=0))
        log.info("eval step %d | %s -> %s", step, question, answer)
        answers.append({"step": step, "input": question, "output": answer})
    if answers:
        monitor.eval_answers(answers)
    if val:
        was_training = model.training
        model.eval()
        if objective is not None and objective.name != "sft":
            record = evaluate_objective(objective, model, val, cfg.batch_size, tokenizer.pad_token_id, dtype)
            model.train(was_training)
            monitor.scalars({"step": step, **record})
            return
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(val), cfg.batch_size):
                losses = token_losses(model, collate(val[i:i + cfg.batch_size], tokenizer.pad_token_id), dtype)
                total += losses.sum().item()
                count += sum(s.n_targets for s in val[i:i + cfg.batch_size])
        model.train(was_training)
        monitor.scalars({"step": step, "val_loss": total / max(count, 1)})
