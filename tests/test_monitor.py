"""Acceptance (issue 4, point 5): a demo run leaves a loss-curve PNG, TensorBoard events, scalars.json, the
evaluation answers and the validation loss, and they hold the logged values."""
from __future__ import annotations

import json

import pytest

from tunelab.config.loader import load_config
from tunelab.train.loop import train


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_models):
    work = tmp_path_factory.mktemp("demo_run")
    cfg, name = load_config("demo", [f"pretrained_model_name_or_path={str(tiny_models['llama'])!r}",
                                     "evaluation_freq=20", "evaluation_data_path='builtin:self_cognition'",
                                     "log_interval=5",
                                     "max_epochs=60"])
    result = train(cfg, name, work_dir=str(work))
    (run_dir,) = [p for p in work.iterdir() if p.is_dir() and p.name[0].isdigit()]
    return result, run_dir


def test_scalars_json_holds_every_logged_step(demo_run):
    result, run_dir = demo_run
    records = [json.loads(line) for line in (run_dir / "vis_data" / "scalars.json").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [1] + list(range(5, result.steps + 1, 5))
    for r in records:
        if "loss" in r:
            assert {"epoch", "lr", "tokens_per_s", "memory_gb", "time"} <= set(r)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 20, 40, result.steps]
    assert val[-1]["val_loss"] < val[0]["val_loss"]


def test_tensorboard_events_match_scalars(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = demo_run
    records = [json.loads(line) for line in (run_dir / "vis_data" / "scalars.json").read_text().splitlines()]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert logged.keys() == expected.keys()
    assert all(abs(logged[s] - expected[s]) < 1e-5 for s in expected)
    assert {e.step for e in events.Scalars("eval/val_loss")} == {r["step"] for r in records if "val_loss" in r}
    assert len(events.Scalars("train/lr")) == len(expected)


def test_loss_curve_png_is_a_real_plot(demo_run):
    import matplotlib.image

    _, run_dir = demo_run
    image = matplotlib.image.imread(run_dir / "loss_curve.png")
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # lines and text, not a blank canvas


def test_evaluation_answers_per_step(demo_run):
    result, run_dir = demo_run
    answers = [json.loads(line) for line in (run_dir / "eval_answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted({a["step"] for a in answers}) == [0, 20, 40, result.steps]
    final = {a["input"]: a["output"] for a in answers if a["step"] == result.steps}
    assert final["who are you"] == "I am tunelab's assistant, a small model fine-tuned on your own data."
    log_text = next(run_dir.glob("*.log")).read_text(encoding="utf-8")
    assert f"eval step {result.steps} | who are you -> I am tunelab's assistant" in log_text


def test_final_adapter_is_exported(demo_run):
    result, _ = demo_run
    hf = result.work_dir / "hf"
    assert (hf / "adapter_config.json").is_file() and (hf / "adapter_model.safetensors").is_file()
    assert json.loads((hf / "tunelab.json").read_text())["prompt_template"] == "internlm_chat"


def test_validation_split_holds_samples_out(tiny_llama, data_dir):
    from tunelab.model.load import load_tokenizer
    from tunelab.train.setup import load_training_data

    cfg, _ = load_config("demo", [f"pretrained_model_name_or_path={str(tiny_llama)!r}", "validation_split=0.25",
                                  f"data_path={str(data_dir / 'alpaca' / 'alpaca_data_first102.json')!r}"])
    train_seqs, val, stats = load_training_data(cfg, load_tokenizer(str(tiny_llama)))
    assert len(val) == round(stats.samples * 0.25)
    assert all(s.position_ids.count(0) == 1 for s in val)  # whole samples, unpacked
    packed_samples = sum(s.position_ids.count(0) for s in train_seqs)
    assert packed_samples + len(val) == stats.samples
    val_ids = {tuple(s.input_ids) for s in val}
    train_ids = set()
    for s in train_seqs:  # unpack by segment
        for seg in set(s.segment_ids):
            train_ids.add(tuple(t for t, g in zip(s.input_ids, s.segment_ids) if g == seg))
    assert not val_ids & train_ids
