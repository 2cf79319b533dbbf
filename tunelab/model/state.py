"""What training stores and restores of a model: its trainable weights (the adapter in PEFT's layout, or every
weight under full fine-tuning) and its PEFT config."""
from __future__ import annotations

import torch

from tunelab.errors import UserError


def trainable_state(model, algorithm: str) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: the adapter in PEFT's file layout, or every weight for full tuning."""
    if algorithm == "full":
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_trainable_state(model, algorithm: str, state: dict[str, torch.Tensor]) -> None:
    if algorithm == "full":
        model.load_state_dict(state)
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"the checkpoint's adapter does not fit this model (e.g. {unexpected[0]}); resume with "
                        f"the config it was trained with")


def peft_config_dict(model) -> dict | None:
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    d = config.to_dict()
    if isinstance(d.get("target_modules"), (set, list)):
        d["target_modules"] = sorted(d["target_modules"])
    return d
