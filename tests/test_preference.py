"""Preference training (objectives dpo, orpo, simpo, kto): losses and LoRA gradients against TRL's own trainers on
the same model and batch, packed rows against one unit per row, the data formats, bad input, and a tiny DPO run."""
from __future__ import annotations

import json
import tempfile
import warnings

import pytest
import torch

from conftest import run_cli, write_config
from tunelab.config.schema import build_config
from tunelab.data.dataset import DataStats, collate, pack
from tunelab.data.encode import IGNORE, PromptFormat
from tunelab.data.preference import CHOSEN, Judged, Pair, encode_units, load_preferences
from tunelab.data.turns import Turn
from tunelab.errors import DataError
from tunelab.model.losses import token_losses
from tunelab.train.objective import make_objective

pytest.importorskip("trl")

PAIRS = [("What is the capital of France?", "Sure! It is Paris. Happy to help.", "Look it up."),
         ("How many legs does a spider have?", "Sure! A spider has eight legs.", "Whatever, ask someone else."),
         ("2 + 2?", "Sure! 4.", "Not my problem at all, figure it out yourself."),
         ("Name a colour.", "Sure! Blue is a colour. Happy to help.", "No.")]


def _cfg(model_path, **over):
    return build_config(dict(pretrained_model_name_or_path=str(model_path), data_path="unused",
                             prompt_template="default", algorithm="lora", max_length=256, **over), "test")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _randomise_b(model):
    """LoRA B matrices random (seeded), so that the policy is not its reference and every LoRA weight has a
    gradient."""
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _policy(tiny_llama):
    """A tiny Llama in fp32 with LoRA (no dropout) on every linear layer."""
    from peft import get_peft_model

    return _randomise_b(get_peft_model(_base(tiny_llama), _lora()))


def _base(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)


def _units(cfg, tokenizer, items):
    return encode_units(cfg, PromptFormat(tokenizer, cfg.prompt_template), items, DataStats())


def _tunelab(model, tokenizer, cfg, rows):
    """tunelab's loss and LoRA gradients over `rows` (one micro-batch)."""
    objective = make_objective(cfg)
    if objective.needs_reference:
        objective.reference(model, rows, len(rows), tokenizer.pad_token_id, torch.float32)
    model.zero_grad(set_to_none=True)
    objective.begin([rows])
    batch = collate(rows, tokenizer.pad_token_id)
    loss = objective.loss(token_losses(model, batch, torch.float32), batch, rows)
    loss.backward()
    return loss.detach(), _lora_grads(model), objective.figures()


def _lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.zero_grad(set_to_none=True)
    return grads


def _segments(units, segment: int):
    """(ids, labels) of segment `segment` of every unit: labels hold the target tokens, IGNORE elsewhere."""
    out = []
    for u in units:
        at = [i for i, s in enumerate(u.segment_ids) if s == segment]
        ids = [u.input_ids[i] for i in at]
        labels = [IGNORE] + [u.targets[i] for i in at][:-1]  # token t is a target when t-1 predicts it
        out.append((ids, labels))
    return out


def _padded(rows, pad_id):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    return ids, labels, mask


def _trl_dpo_inputs(units, pad_id):
    ids, labels, mask = _padded(_segments(units, 0) + _segments(units, 1), pad_id)
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": (labels != IGNORE).long()}


def _trl_pair_batch(units, pad_id):
    """The batch the experimental ORPO and CPO (SimPO) trainers' concatenated_forward reads."""
    batch = {}
    for side, segment in (("chosen", 0), ("rejected", 1)):
        ids, labels, mask = _padded(_segments(units, segment), pad_id)
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    return batch


def _trainer(kind, tiny_llama, tokenizer, **args):
    """TRL's trainer of `kind` over the tiny Llama, LoRA added by TRL itself (so that, as in tunelab, DPO's and
    KTO's reference is the base with the adapter off); its model has random LoRA B matrices."""
    from datasets import Dataset

    warnings.filterwarnings("ignore")
    common = dict(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False)
    if kind == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
        rows = [{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 2
    elif kind == "kto":
        from trl import KTOConfig as Config, KTOTrainer as Trainer
        rows = [{"prompt": "hi", "completion": "a", "label": i % 2 == 0} for i in range(4)]
    elif kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
        rows = [{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 2
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
        rows = [{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 2
    trainer = Trainer(model=_base(tiny_llama), args=Config(**common, **args), train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=_lora())
    return trainer, _randomise_b(trainer.model)


def _close(ours, theirs):
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-5, rtol=1e-5)


def _same_loss_and_grads(ours, our_grads: dict, theirs, model) -> None:
    """TRL's loss `theirs` (backpropagated here into `model`) and its LoRA gradients equal tunelab's (1e-5)."""
    theirs.backward()
    _close(ours, theirs.detach())
    for name, grad in _lora_grads(model).items():
        _close(our_grads[name], grad)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trl(tokenizer, tiny_llama, loss):
    """Acceptance 1: DPO's loss and LoRA gradients equal TRL's DPOTrainer's on the same model and batch, the
    reference being the base with the adapter off on both sides."""
    cfg = _cfg(tiny_llama, objective="dpo", pref_loss=loss, pref_beta=0.3)
    units = _units(cfg, tokenizer, [Pair([Turn(q, "")], c, r) for q, c, r in PAIRS])
    trainer, model = _trainer("dpo", tiny_llama, tokenizer, beta=0.3, loss_type=[loss])
    ours, our_grads, figures = _tunelab(model, tokenizer, cfg, units)
    theirs = trainer._compute_loss(model, _trl_dpo_inputs(units, tokenizer.pad_token_id), False)
    _same_loss_and_grads(ours, our_grads, theirs, model)
    logged = trainer._metrics["train"]
    if loss != "ipo":  # (tunelab's ipo rewards are over the per-token averages its loss reads)
        assert figures["reward_margin"] == pytest.approx(logged["rewards/margins"][-1], abs=1e-5)
    assert figures["logps_chosen"] == pytest.approx(logged["logps/chosen"][-1], abs=1e-4)


@pytest.mark.slow
def test_conservative_dpo_matches_trl_smoothed_sigmoid(tokenizer, tiny_llama):
    """Label smoothing (conservative DPO): TRL writes it in its CPO trainer's sigmoid, over the log-ratios."""
    cfg = _cfg(tiny_llama, objective="dpo", pref_beta=0.5, pref_label_smoothing=0.2)
    units = _units(cfg, tokenizer, [Pair([Turn(q, "")], c, r) for q, c, r in PAIRS])
    trainer, model = _trainer("cpo", tiny_llama, tokenizer, beta=0.5, label_smoothing=0.2, loss_type="sigmoid")
    ours, _, _ = _tunelab(model, tokenizer, cfg, units)
    with torch.no_grad():
        chosen, rejected = trainer.concatenated_forward(model, _trl_pair_batch(units, tokenizer.pad_token_id))[:2]
    reference = torch.tensor([u.reference for u in units])
    losses, _, _ = trainer.cpo_loss(chosen - reference[:, 0], rejected - reference[:, 1])
    _close(ours, losses.mean())


@pytest.mark.slow
def test_orpo_matches_trl(tokenizer, tiny_llama):
    """ORPO: the odds-ratio term and the average log-probs are TRL's; the next-token term is the mean loss over
    the chosen answers' tokens (tunelab masks the prompt, where TRL's ORPO trainer counts it too)."""
    cfg = _cfg(tiny_llama, objective="orpo", orpo_lambda=0.25)
    units = _units(cfg, tokenizer, [Pair([Turn(q, "")], c, r) for q, c, r in PAIRS])
    trainer, model = _trainer("orpo", tiny_llama, tokenizer, beta=0.25)
    ours, our_grads, _ = _tunelab(model, tokenizer, cfg, units)
    batch = _trl_pair_batch(units, tokenizer.pad_token_id)
    chosen, rejected = trainer.concatenated_forward(model, batch)[:2]  # per-token averages
    tokens = (batch["chosen_labels"][:, 1:] != IGNORE).sum(-1)
    nll = -(chosen * tokens).sum() / tokens.sum()
    theirs = nll - trainer.odds_ratio_loss(chosen, rejected)[0].mean()
    _same_loss_and_grads(ours, our_grads, theirs, model)


@pytest.mark.slow
def test_simpo_matches_trl(tokenizer, tiny_llama):
    """SimPO equals TRL's CPO trainer with loss_type 'simpo' and no behaviour-cloning term (cpo_alpha 0)."""
    cfg = _cfg(tiny_llama, objective="simpo", pref_beta=2.0, simpo_gamma=0.8, pref_label_smoothing=0.1)
    units = _units(cfg, tokenizer, [Pair([Turn(q, "")], c, r) for q, c, r in PAIRS])
    trainer, model = _trainer("cpo", tiny_llama, tokenizer, beta=2.0, simpo_gamma=0.8, label_smoothing=0.1,
                              loss_type="simpo", cpo_alpha=0.0)
    ours, our_grads, _ = _tunelab(model, tokenizer, cfg, units)
    theirs, metrics = trainer.get_batch_loss_metrics(model, _trl_pair_batch(units, tokenizer.pad_token_id))
    _same_loss_and_grads(ours, our_grads, theirs, model)


@pytest.mark.slow
def test_kto_matches_trl(tokenizer, tiny_llama):
    """KTO (with its KL reference point from mismatched answers) equals TRL's KTOTrainer."""
    cfg = _cfg(tiny_llama, objective="kto", pref_beta=0.2, kto_desirable_weight=1.5, kto_undesirable_weight=0.7)
    items = [Judged([Turn(q, "")], c if i % 3 else r, bool(i % 3)) for i, (q, c, r) in enumerate(PAIRS * 2)]
    units = _units(cfg, tokenizer, items)
    trainer, model = _trainer("kto", tiny_llama, tokenizer, beta=0.2, desirable_weight=1.5, undesirable_weight=0.7,
                              per_device_train_batch_size=len(units))
    ours, our_grads, _ = _tunelab(model, tokenizer, cfg, units)
    answers, mismatched = _padded(_segments(units, 0), 0), _padded(_segments(units, 1), 0)
    inputs = {"input_ids": answers[0], "attention_mask": answers[2], "completion_mask": (answers[1] != IGNORE).long(),
              "KL_input_ids": mismatched[0], "KL_attention_mask": mismatched[2],
              "KL_completion_mask": (mismatched[1] != IGNORE).long(),
              "label": torch.tensor([u.kinds[0] == CHOSEN for u in units])}
    theirs = trainer._compute_loss(model, inputs, False)
    _same_loss_and_grads(ours, our_grads, theirs, model)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_packed_equals_one_unit_per_row(tokenizer, tiny_llama, objective):
    """Acceptance 2: many units packed in one row (attention confined to each answer) give the loss and the LoRA
    gradients of one unit per row."""
    model = _policy(tiny_llama)
    cfg = _cfg(tiny_llama, objective=objective)
    units = _units(cfg, tokenizer, [Pair([Turn(q, "")], c, r) for q, c, r in PAIRS])
    alone, alone_grads, _ = _tunelab(model, tokenizer, cfg, units)
    rows = pack(units, 4096)
    assert len(rows) == 1 and max(rows[0].segment_ids) == 2 * len(units) - 1
    packed, packed_grads, _ = _tunelab(model, tokenizer, cfg, rows)
    _close(packed, alone)
    for name, grad in alone_grads.items():
        _close(packed_grads[name], grad)


@pytest.mark.parametrize("objective,ftx", [("dpo", 0.5), ("kto", 0.0), ("orpo", 0.0)])
def test_token_weights_carry_the_objectives_gradient(tokenizer, tiny_llama, objective, ftx):
    """With CUDA graphs a preference step is two graphs, forward and backward, the objective computed between them
    on the forward's per-token losses; its gradient reaches the model as per-token weights (fast.graphs.
    objective_weights). On the fast path (CPU, fp32, packed rows, every layer recomputed from its input on the
    host) back-propagating those weights gives the objective's own loss and LoRA gradients."""
    from functools import partial

    from tunelab.fast.decoder import FastDecoder
    from tunelab.fast.graphs import objective_weights

    model = _policy(tiny_llama)
    cfg = _cfg(tiny_llama, objective=objective, pref_ftx=ftx)
    rows = pack(_units(cfg, tokenizer, [Pair([Turn(q, "")], c, r) for q, c, r in PAIRS]), 160)
    assert len(rows) > 1 and all(max(r.segment_ids) > 0 for r in rows)
    objective_ = make_objective(cfg)
    if objective_.needs_reference:
        objective_.reference(model, rows, 2, tokenizer.pad_token_id, torch.float32)
    fast = FastDecoder(model, offload=True)
    batch = collate(rows, tokenizer.pad_token_id)
    objective_.begin([rows])
    direct = objective_.loss(fast.token_losses(batch, torch.float32), batch, rows)
    direct.backward()
    direct_grads = _lora_grads(model)
    objective_.begin([rows])
    losses = fast.token_losses(batch, torch.float32)
    loss, weights = objective_weights(partial(objective_.loss, batch=batch, rows=rows), losses)
    assert weights.shape == losses.shape and bool((weights[batch["segment_ids"] < 0] == 0).all())  # padding
    losses.backward(weights)
    _close(loss, direct.detach())
    for name, grad in _lora_grads(model).items():
        torch.testing.assert_close(grad, direct_grads[name], atol=1e-6, rtol=1e-5)


def test_a_long_reference_pass_says_how_far_it_is(tokenizer, tiny_llama, caplog, monkeypatch):
    """The reference pass runs before the first step: past REFERENCE_QUIET_S it logs its progress at each tenth of
    the rows (here the quiet time is 0), and the log-probs it fills are the same in any batch order."""
    import logging

    from tunelab.train import objective as objective_module

    model = _policy(tiny_llama)
    cfg = _cfg(tiny_llama, objective="dpo")
    rows = _units(cfg, tokenizer, [Pair([Turn(q, "")], c, r) for q, c, r in PAIRS * 5])
    objective = make_objective(cfg)
    def progress():
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("reference log-probs:")]

    with caplog.at_level(logging.INFO, logger="tunelab"):
        objective.reference(model, rows, 1, tokenizer.pad_token_id, torch.float32)
        assert progress() == []  # a short pass says nothing
        alone = [list(r.reference) for r in rows]
        monkeypatch.setattr(objective_module, "REFERENCE_QUIET_S", 0)
        objective.reference(model, rows, 3, tokenizer.pad_token_id, torch.float32)
    lines = progress()
    expected = [f"reference log-probs: {n} of 20" for n in (3, 6, 9, 12, 15, 18)]
    assert [line.split(" rows")[0] for line in lines] == expected
    for row, ref in zip(rows, alone):
        torch.testing.assert_close(torch.tensor(row.reference), torch.tensor(ref), atol=1e-4, rtol=1e-5)


def _load(tmp_path, records, objective="dpo", **over):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    cfg = build_config(dict(pretrained_model_name_or_path="unused", data_path=str(path), objective=objective,
                            **over), "test")
    stats = DataStats()
    return [item for _, item in load_preferences(cfg, stats)], stats


CHAT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
FORMATS = {
    "trl_pairs": {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
    "trl_pairs ": {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "Hello!"}],
                   "rejected": [{"role": "assistant", "content": "Go away."}]},
    "trl_pairs  ": {"chosen": [*CHAT, {"role": "assistant", "content": "Hello!"}],  # implicit prompt; UltraFeedback
                    "rejected": [*CHAT, {"role": "assistant", "content": "Go away."}], "prompt": "Hi?"},
    "alpaca_pairs": {"instruction": "Hi?", "input": "", "chosen": "Hello!", "rejected": "Go away.",
                     "system": "Be kind."},
    "sharegpt_pairs": {"conversations": [{"from": "human", "value": "Hi?"}], "system": "Be kind.",
                       "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go away."}},
    "openai_pairs": {"messages": CHAT, "chosen": {"role": "assistant", "content": "Hello!"},
                     "rejected": {"role": "assistant", "content": "Go away."}},
    "ultrafeedback": {"instruction": "Hi?", "completions": [{"response": "Meh.", "overall_score": 5},
                                                            {"response": "Hello!", "overall_score": 9},
                                                            {"response": "Go away.", "overall_score": 2}]},
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_pair_formats(tmp_path, name):
    [pair], stats = _load(tmp_path, [FORMATS[name]])
    assert list(stats.formats.values()) == [name.strip()]
    assert (pair.prompt[-1].input, pair.chosen, pair.rejected) == ("Hi?", "Hello!", "Go away.")
    if "Be kind." in json.dumps(FORMATS[name]):
        assert pair.prompt[0].system == "Be kind."


def test_kto_rows_and_pairs_as_kto(tmp_path):
    rows = [{"prompt": "Hi?", "completion": "Hello!", "label": True},
            {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Go away."}],
             "kto_tag": False}]
    judged = [_load(tmp_path, [row], objective="kto")[0][0] for row in rows]
    assert [(j.answer, j.desirable) for j in judged] == [("Hello!", True), ("Go away.", False)]


def test_units_share_the_prompt_and_mask_it(tokenizer, tiny_llama):
    """Chosen and rejected continue the same prompt tokens, and only the answers are targets."""
    cfg = _cfg(tiny_llama, objective="dpo")
    [unit] = _units(cfg, tokenizer, [Pair([Turn("Hi?", "")], "Hello there!", "Go away.")])
    (chosen, chosen_labels), (rejected, rejected_labels) = _segments([unit], 0)[0], _segments([unit], 1)[0]
    prompt = len(PromptFormat(tokenizer, "default").encode([Turn("Hi?", "")], open_last=True)[0])
    assert chosen[:prompt] == rejected[:prompt] and chosen[prompt:] != rejected[prompt:]
    assert all(t == IGNORE for t in chosen_labels[:prompt] + rejected_labels[:prompt])
    assert tokenizer.decode([t for t in chosen_labels if t != IGNORE]).startswith("Hello there!")
    assert unit.kinds == [CHOSEN, 0]


BAD = [({"prompt": "Hi?", "chosen": "", "rejected": "No."}, "dpo", "line 1: the 'chosen' answer is empty"),
       ({"instruction": "Hi?", "chosen": "Hello!", "rejected": "  "}, "orpo", "line 1: the 'rejected' answer is empty"),
       ({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, "dpo",
        "line 1: the chosen and rejected answers are identical"),
       ({"prompt": "Hi?", "completion": "Hello!"}, "kto", "line 1: missing 'label' (true for a desirable answer"),
       ({"prompt": "Hi?", "completion": "Hello!", "label": True}, "dpo", "line 1: a KTO row")]


@pytest.mark.parametrize("record, objective, message", BAD)
def test_bad_preference_records(tmp_path, record, objective, message):
    with pytest.raises(DataError) as exc:
        _load(tmp_path, [record], objective=objective)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.slow
@pytest.mark.parametrize("record, objective, message", [BAD[2], BAD[3]])
def test_bad_preference_records_one_line_exit_2(tmp_path, tiny_llama, record, objective, message):
    """Acceptance 5: one line naming the file and line, exit 2, before any model loads or anything is written."""
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    cfg = write_config(tmp_path / "c.py", pretrained_model_name_or_path=str(tiny_llama), data_path=str(data),
                       objective=objective, prompt_template="default", algorithm="lora")
    out = run_cli("train", cfg, "--work-dir", tmp_path / "work", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and str(data) in lines[0], out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "work").exists()


@pytest.mark.slow
def test_demo_dpo_learns_the_chosen_style(tmp_path):
    """Acceptance 3: `tunelab train demo_dpo` (DPO with the chosen answers' next-token loss, pref_ftx) raises the
    reward accuracy on held-out pairs from 50% (the model is its reference) to above 90%, its margin rises, and
    its answers to new questions take the chosen style."""
    # evaluated (and saved) only before training and at the end
    out = run_cli("train", "demo_dpo", "--work-dir", tmp_path / "work", "--cfg-options", "evaluation_freq=1000",
                  "save_steps=1000", cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    [scalars] = (tmp_path / "work").glob("*/vis_data/scalars.json")
    records = [json.loads(line) for line in scalars.read_text().splitlines()]
    evals = [r for r in records if "val_reward_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[0]["val_reward_accuracy"] == pytest.approx(0.5)
    assert evals[-1]["val_reward_accuracy"] > 0.9 and evals[-1]["val_reward_margin"] > 1.0
    steps = [r for r in records if "reward_margin" in r]
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"] + 1.0
    assert all(k in steps[-1] for k in ("reward_accuracy", "logps_chosen", "logps_rejected"))
    [answers] = (tmp_path / "work").glob("*/eval_answers.jsonl")
    last = [json.loads(line) for line in answers.read_text().splitlines()][-2:]
    assert all(a["output"].startswith("Sure!") for a in last), last
    assert list((tmp_path / "work").glob("*/tensorboard/events.*"))
    assert list((tmp_path / "work").glob("*/loss_curve.png"))


@pytest.mark.slow
def test_dpo_speed_bench_runs_on_a_cpu(tmp_path):
    """bench/dpo_speed.py (acceptance 4 is measured with it on the GPU machine) runs its sides (TRL, tunelab, tunelab
    with no layer recomputed) on a tiny shape."""
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "dpo_speed.py"), "--shape", "tiny", "--algorithm",
                          "lora", "--warmup", "1", "--steps", "1", "--pair-tokens", "128", "--model-dir",
                          str(tmp_path / "model")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| trl |", "| tunelab |", "| tunelab@0 |"))]
    assert len(rows) == 3 and "failed" not in out.stdout, out.stdout
