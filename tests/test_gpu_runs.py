"""GPU: the fast path through whole runs. A CUDA graph capture that fails leaves the run healthy and eager for
that shape alone; `tunelab train` (the CLI) on real data over max_length, packing, batch size, accumulation,
evaluation and algorithm finishes, and a run interrupted (SIGKILL, Ctrl-C) and resumed, then resumed again
once finished, logs the uninterrupted run's losses. Skipped without CUDA (bench/RESULTS.md has the runs)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import DATA, fault_env, run_losses
from test_fast import _batch, _gpu_lora_model_and_batch, _single_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


# -- a capture that fails ------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["host_sync", "python_error"])
def test_gpu_failed_capture_runs_eagerly_and_later_shapes_are_captured(tiny_llama, monkeypatch, caplog, failure):
    """The first capture (of packed 512-wide rows) fails on purpose: by a host sync inside it, which
    invalidates the capture as cuDNN's device allocation did, or by a Python error halfway. That step and every
    later one of that shape run eagerly with the eager losses and gradients, one warning says so, the current
    stream is the default one again, LoRA dropout still draws its seeds, and the next shapes (single rows of
    1,024) are captured and replayed."""
    from tunelab.fast.decoder import FastDecoder
    from tunelab.fast.graphs import GraphedSteps
    from tunelab.train.step import forward_backward

    model, _ = _gpu_lora_model_and_batch(tiny_llama, seed=5, dropout=0.1)
    fast = FastDecoder(model, compile=True, offload=True)  # offloaded: copies in flight when the capture breaks
    params = [p for p in model.parameters() if p.requires_grad]
    model.tunelab_fast, model.tunelab_graphs = fast, GraphedSteps(fast, params)
    eager_losses = fast.token_losses

    def breaking(batch, dtype, layout=None):
        if torch.cuda.is_current_stream_capturing() and batch["input_ids"].shape[1] == 512:
            if failure == "host_sync":
                batch["input_ids"].sum().item()
            else:
                raise RuntimeError("injected")
        return eager_losses(batch, dtype, layout)
    monkeypatch.setattr(fast, "token_losses", breaking)

    vocab = model.config.vocab_size
    packed = [_batch(vocab, lengths, seed=s) for s, lengths in
              enumerate([[[200, 150, 162], [300, 212]], [[120, 300, 92], [250, 262]], [[512], [100, 412]]])]
    single = [_single_rows(vocab, 2, 1024, seed) for seed in range(3)]

    def reference(batch):
        model.zero_grad(set_to_none=True)
        torch.cuda.manual_seed(11)
        loss = eager_losses(batch, torch.bfloat16).sum() / 300
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    caplog.set_level(logging.INFO, logger="tunelab")
    for name, batch in [(f"packed {i}", b) for i, b in enumerate(packed)] + \
            [(f"single {i}", b) for i, b in enumerate(single)] + [("packed again", packed[1])]:
        ref_loss, ref_grads = reference(batch)
        model.zero_grad(set_to_none=True)
        torch.cuda.manual_seed(11)
        loss = forward_backward(model, batch, torch.bfloat16, 300)
        assert torch.cuda.current_stream() == torch.cuda.default_stream(), name
        torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-3, msg=name)
        for p, r in zip(params, ref_grads):
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten().float(), r.flatten().float(), dim=0)
            assert cos > 0.999, (name, float(cos))
    graphs = model.tunelab_graphs
    assert list(graphs.failed) == [(2, 512, 8)], graphs.failed
    assert (2, 1024, 0, True) in graphs.graphs, list(graphs.graphs)
    failures = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(failures) == 1 and "runs without a graph from now on" in failures[0], failures
    torch.cuda.synchronize()  # the context is healthy: no error is left to surface


# -- `tunelab train` on real data, interrupted and resumed ---------------------------------------------------

# TinyLlama 1.1B's dimensions (GQA 32/4), with a 32,000-row vocabulary as it has; tunelab's tiny tokenizer uses
# the first rows
SHAPE_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)

# name -> the settings a user edits in the tutorial's config, and how the run is interrupted. Each value of
# max_length, packing, batch size, accumulation and evaluation appears; the epoch stories run a whole epoch (its
# last batch is short, or its last packed row part-filled); "full" takes the plain path, on the tiny model
# (a 1.1B model's fp32 weights and AdamW states would write 13 GB a checkpoint)
STORIES = {
    "lora-512-rows4-eval": dict(algorithm="lora", data="alpaca/alpaca_data_cleaned_1000.json", max_length=512,
                                pack_to_max_length=False, batch_size=4, accumulative_counts=1, evaluation=True,
                                stop="kill"),
    "qlora-1024-packed-acc4-eval": dict(algorithm="qlora", data="medqa2019/MedQA2019-structured-train.jsonl",
                                        max_length=1024, pack_to_max_length=True, batch_size=1,
                                        accumulative_counts=4, evaluation=True, stop="kill"),
    "lora-2048-packed-rows4-acc4": dict(algorithm="lora", data="oasst/en_100_tree.jsonl", max_length=2048,
                                        pack_to_max_length=True, batch_size=4, accumulative_counts=4,
                                        evaluation=False, stop="ctrl-c"),
    "qlora-4096-packed-epoch": dict(algorithm="qlora", data="medqa2019/MedQA2019-structured-train.jsonl",
                                    max_length=4096, pack_to_max_length=True, batch_size=1, accumulative_counts=1,
                                    evaluation=False, stop="kill", epoch=True),
    "lora-2048-rows4-epoch": dict(algorithm="lora", data="self_cognition/ms_swift_self_cognition.jsonl",
                                  max_length=2048, pack_to_max_length=False, batch_size=4, accumulative_counts=1,
                                  evaluation=True, stop="kill", epoch=True),
    "full-512-packed-rows4-epoch": dict(algorithm="full", data="alpaca/alpaca_data_first102.json", max_length=512,
                                        pack_to_max_length=True, batch_size=4, accumulative_counts=1,
                                        evaluation=True, stop="kill", epoch=True, model="tiny"),
}


@pytest.fixture(scope="session")
def llama_1b() -> Path:
    """The 1.1B-shaped model (random bf16 weights, norms off their init), built once per machine: test
    workers (pytest-xdist) share it."""
    from filelock import FileLock
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.model.tiny import build_tokenizer

    root = Path(os.environ.get("TUNELAB_GPU_MODELS", tempfile.gettempdir())) / "tunelab_llama_1b"
    with FileLock(f"{root}.lock"):
        if not (root / "config.json").is_file():
            tokenizer = build_tokenizer()
            config = LlamaConfig(**SHAPE_1B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = LlamaForCausalLM(config).to(torch.bfloat16)
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if "norm" in name:
                            p.uniform_(0.8, 1.2)
            model.save_pretrained(root.with_suffix(".tmp"))
            tokenizer.save_pretrained(root.with_suffix(".tmp"))
            root.with_suffix(".tmp").rename(root)
    return root


def _train(cfg: Path, work: Path, log: Path, *extra: str, fault: str = "", wait: bool = True):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(fault_env(fault) if fault else {}))
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg), "--work-dir", str(work),
                                 *extra], stdout=subprocess.DEVNULL, stderr=err, env=env)
    if wait:
        proc.wait(timeout=480)
    return proc


def _interrupted(story: dict, cfg: Path, work: Path, log: Path, at: int) -> None:
    """A run stopped after step `at`: SIGKILL (no checkpoint of its own), or Ctrl-C (saves one, exits 130)."""
    if story["stop"] == "kill":
        proc = _train(cfg, work, log, fault=f"kill_after_step={at}")
        assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        return
    proc = _train(cfg, work, log, wait=False)
    deadline = time.time() + 480
    while len(run_losses(work)) < at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STORIES))
def test_gpu_run_interrupted_and_resumed_matches_the_uninterrupted_run(name, request, tmp_path):
    story = STORIES[name]
    model = request.getfixturevalue("tiny_llama" if story.get("model") == "tiny" else "llama_1b")
    logs = Path(os.environ.get("TUNELAB_GPU_LOGS", tmp_path)) / name
    logs.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "tunelab", "copy-cfg", "internlm_chat_7b_qlora_oasst1_e3", str(tmp_path)],
                   check=True, capture_output=True)
    cfg = tmp_path / "internlm_chat_7b_qlora_oasst1_e3_copy.py"
    settings = {k: v for k, v in story.items() if k not in ("data", "evaluation", "stop", "epoch", "model")}
    settings.update(pretrained_model_name_or_path=str(model), data_path=str(DATA / story["data"]),
                    trust_remote_code=False, max_epochs=1, max_steps=0 if story.get("epoch") else 8,
                    save_steps=3, save_total_limit=2, log_interval=1, lora_r=16,
                    data_placeholders={"NAME": "tunelab", "AUTHOR": "tunelab"}, evaluation_inputs=[])
    if story["evaluation"]:  # prompts answered and a validation loss, before, during and after training
        settings.update(evaluation_inputs=["Please tell me five scenic spots in Shanghai"], evaluation_freq=3,
                        evaluation_max_new_tokens=16, validation_split=0.05)
    with open(cfg, "a", encoding="utf-8") as f:  # later assignments win, as a user's edits would
        f.write("".join(f"{k} = {v!r}\n" for k, v in settings.items()))

    straight = tmp_path / "straight"
    proc = _train(cfg, straight, logs / "straight.log")
    text = (logs / "straight.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    reference = run_losses(straight)
    total = len(reference)
    assert sorted(reference) == list(range(1, total + 1)) and total >= 6, (total, text[-2000:])
    if story["algorithm"] != "full":
        assert "CUDA graphs: True" in text and "captured a CUDA graph" in text, text[-3000:]

    at = total // 2 + 1  # SIGKILL: resumed from the checkpoint before it; Ctrl-C: from its own
    interrupted = tmp_path / "interrupted"
    _interrupted(story, cfg, interrupted, logs / "interrupted.log", at)
    proc = _train(cfg, interrupted, logs / "resumed.log", "--resume")
    assert proc.returncode == 0, (logs / "resumed.log").read_text()[-3000:]
    resumed = run_losses(interrupted)
    worst = max(abs(resumed[s] - reference[s]) / abs(reference[s]) for s in range(1, total + 1))
    (logs / "losses.txt").write_text(f"steps {total}, interrupted after {at}, largest relative difference "
                                     f"{worst:.2e}\n")
    assert worst <= 1e-3, (worst, reference, resumed)

    proc = _train(cfg, interrupted, logs / "resumed_again.log", "--resume")
    again = (logs / "resumed_again.log").read_text()
    assert proc.returncode == 0 and f"the run is complete (step {total} of {total})" in again, again[-3000:]
    assert (interrupted / "hf").is_dir()
    for log in logs.glob("*.log"):
        text = log.read_text()
        assert "Traceback" not in text and "capture failed" not in text, (log.name, text[-3000:])
