"""Several processes on the CPU (gloo): `NPROC_PER_NODE=2 tunelab train` through torchrun, DDP for LoRA, FSDP2
for full fine-tuning, the rank-0 tokenisation cache, resume, exit codes, and the DeepSpeed config.

Every torchrun run costs several seconds of start-up, so each one below checks several things."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import fault_env, run_losses, write_config
from tunelab.train.checkpoint import load_checkpoint
from tunelab.config.schema import Config

STEPS = 6


def _run(*args, cwd=None, **env):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **{k: str(v) for k, v in env.items()})
    for key in ("NPROC_PER_NODE", "TUNELAB_FAULT", "TUNELAB_DIST_TIMEOUT"):
        if key not in env:
            full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "tunelab", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


def _assert_same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory, tiny_llama, data_dir):
    """LoRA without dropout (each rank draws its own dropout masks), batch 1 x accumulation 2 per process."""
    folder = tmp_path_factory.mktemp("dist")
    return write_config(
        folder / "run.py", pretrained_model_name_or_path=str(tiny_llama), algorithm="lora",
        data_path=str(data_dir / "alpaca" / "alpaca_data_first102.json"), prompt_template="internlm_chat",
        max_length=160, pack_to_max_length=True, batch_size=1, accumulative_counts=2, max_steps=STEPS,
        lr=1e-3, lora_r=8, lora_alpha=16, lora_dropout=0.0, gradient_checkpointing=False, save_steps=0,
        log_interval=1, evaluation_inputs=[])


@pytest.fixture(scope="module")
def two_process_run(cfg_file):
    """NPROC_PER_NODE=2, with the tokenisation made slower (8 s) than the collective timeout (3 s)."""
    work = cfg_file.parent / "two"
    cp = _run("train", cfg_file, "--work-dir", work, NPROC_PER_NODE=2, **fault_env("slow_tokenize=8"),
              TUNELAB_DIST_TIMEOUT=3)
    return work, cp


@pytest.mark.slow
def test_two_processes_survive_slow_tokenisation_and_write_once(two_process_run):
    """Acceptance 3 and 'one set of checkpoints': the rank that does not tokenise waits on the cache's file lock
    instead of in a collective (a barrier would time out after 3 s); only rank 0 logs and writes."""
    work, cp = two_process_run
    assert cp.returncode == 0, cp.stderr[-4000:]
    assert "gloo, 2 processes, collective timeout 3s" in cp.stderr
    assert "parallel: ddp over 2 processes" in cp.stderr
    assert cp.stderr.count(f"step 1/{STEPS} |") == 1  # rank 1 does not log
    assert sorted(p.name for p in work.glob("*.pth")) == [f"iter_{STEPS}.pth"]  # max_steps stops mid-epoch
    assert len(list(work.glob("*/vis_data"))) == 1
    scalars = next(work.glob("*/vis_data/scalars.json")).read_text().splitlines()
    assert [json.loads(line)["step"] for line in scalars] == list(range(1, STEPS + 1))
    assert len(list((work / "tokenized_cache").glob("*.pkl"))) == 1
    assert (work / "hf" / "adapter_model.safetensors").is_file()
    state = load_checkpoint(work / f"iter_{STEPS}.pth")
    assert state["meta"]["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert "ChildFailedError" not in cp.stderr and "Traceback" not in cp.stderr


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(two_process_run, cfg_file, tmp_path):
    """Acceptance 1: 2 processes x batch_size 1 x accumulation 2 = one process with batch_size 2: the same 4
    sequences per step, the same per-step losses and final adapter."""
    work, cp = two_process_run
    assert cp.returncode == 0, cp.stderr[-4000:]
    ddp = run_losses(work)
    assert sorted(ddp) == list(range(1, STEPS + 1))
    one = _run("train", cfg_file, "--work-dir", tmp_path / "batch2", "--cfg-options", "batch_size=2")
    assert one.returncode == 0, one.stderr[-3000:]
    _assert_same_losses(ddp, run_losses(tmp_path / "batch2"), range(1, STEPS + 1))
    a = load_checkpoint(work / f"iter_{STEPS}.pth")["model"]
    b = load_checkpoint(tmp_path / "batch2" / f"iter_{STEPS}.pth")["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_fast_path_on_two_processes_equals_one_process(cfg_file, tmp_path):
    """The fast path under DDP: fast_path = 'on' with 2 processes x batch_size 1 gives the per-step losses and the
    adapter of one process with batch_size 2, also on the fast path (gloo; DDP wraps the fast forward)."""
    two = _run("train", cfg_file, "--work-dir", tmp_path / "two", "--cfg-options", "fast_path=on", NPROC_PER_NODE=2)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "parallel: ddp over 2 processes" in two.stderr
    assert "fast path on" in two.stderr and "; 2 processes, DDP)" in two.stderr
    one = _run("train", cfg_file, "--work-dir", tmp_path / "one", "--cfg-options", "fast_path=on", "batch_size=2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "fast path on" in one.stderr
    losses = run_losses(tmp_path / "two")
    assert sorted(losses) == list(range(1, STEPS + 1))
    _assert_same_losses(losses, run_losses(tmp_path / "one"), range(1, STEPS + 1))
    a = load_checkpoint(tmp_path / "two" / f"iter_{STEPS}.pth")["model"]
    b = load_checkpoint(tmp_path / "one" / f"iter_{STEPS}.pth")["model"]
    assert a.keys() == b.keys()
    for key in a:
        # Adam divides by each gradient's own size: where one is near zero, the order of the sums (two ranks'
        # halves reduced, or one process's whole) shows in its update (1.2e-5 seen after 6 steps)
        torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("objective,fast_path,algorithm", [("dpo", "on", "lora"), ("kto", "off", "lora"),
                                                         ("dpo", "off", "full")])
def test_preference_objectives_on_two_processes_equal_one_process(tiny_llama, tmp_path, objective, fast_path,
                                                                  algorithm):
    """DPO (LoRA on the fast path, and full fine-tuning: FSDP2, its reference computed before training) and KTO
    (plain path) on 2 processes x batch_size 1 give the per-step losses and the trained weights of one process with
    batch_size 2. KTO's reference point, a mean over the micro-batch's mismatched answers, is summed over both
    processes' rows, as one process with the whole micro-batch computes it."""
    cfg = write_config(
        tmp_path / "run.py", pretrained_model_name_or_path=str(tiny_llama), algorithm=algorithm,
        data_path="builtin:preference_demo", prompt_template="default", objective=objective, pref_beta=0.1,
        max_length=256, pack_to_max_length=False, batch_size=1, accumulative_counts=2, max_steps=4,
        lr=1e-3 if algorithm == "lora" else 1e-4,
        lora_r=8, lora_alpha=16, lora_dropout=0.0, gradient_checkpointing=False, save_steps=0, log_interval=1,
        evaluation_inputs=[], fast_path=fast_path)
    two = _run("train", cfg, "--work-dir", tmp_path / "two", NPROC_PER_NODE=2)
    assert two.returncode == 0, two.stderr[-4000:]
    assert f"parallel: {'fsdp' if algorithm == 'full' else 'ddp'} over 2 processes" in two.stderr
    assert ("fast path on" in two.stderr) == (fast_path == "on")
    one = _run("train", cfg, "--work-dir", tmp_path / "one", "--cfg-options", "batch_size=2")
    assert one.returncode == 0, one.stderr[-3000:]
    losses = run_losses(tmp_path / "two")
    assert sorted(losses) == [1, 2, 3, 4]
    _assert_same_losses(losses, run_losses(tmp_path / "one"), range(1, 5))
    a = load_checkpoint(tmp_path / "two" / "iter_4.pth")["model"]
    b = load_checkpoint(tmp_path / "one" / "iter_4.pth")["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=0)


def test_equivalent_configs_take_the_same_sequences_per_step(tiny_llama):
    """What makes the runs above equal: N ranks x batch_size B x accumulation A, one process x B*N x A and one
    process x B x A*N all group the epoch's sequences into the same steps (the last one short)."""
    from tunelab.data.dataset import Sequence
    from tunelab.train.step import epoch_windows

    sequences = [Sequence([i], [i], [0], [0]) for i in range(23)]

    def steps(batch_size, accumulative_counts, world):
        cfg = Config(pretrained_model_name_or_path="x", data_path="y", batch_size=batch_size,
                     accumulative_counts=accumulative_counts)
        return [sorted(s.input_ids[0] for micro in window for s in micro)
                for window in epoch_windows(sequences, cfg, 1, world)]

    ranks = steps(1, 2, 2)
    assert len(ranks) == 6 and [len(s) for s in ranks] == [4, 4, 4, 4, 4, 3]
    assert ranks == steps(2, 2, 1) == steps(1, 4, 1)
    assert ranks == steps(1, 1, 4)  # 4 ranks without accumulation too


@pytest.mark.slow
def test_killed_two_process_run_resumes_with_two_or_one(two_process_run, cfg_file, tmp_path):
    """Killed after step 4 (checkpoint at step 3): `--resume` with 2 processes, or with 1 process and the same
    global batch, continues with the losses of the uninterrupted run."""
    straight = run_losses(two_process_run[0])
    work = tmp_path / "killed"
    cp = _run("train", cfg_file, "--work-dir", work, "--cfg-options", "save_steps=3", NPROC_PER_NODE=2,
              **fault_env("kill_after_step=4"))
    assert cp.returncode != 0
    assert sorted(p.name for p in work.glob("*.pth")) == ["iter_3.pth"]
    alone = tmp_path / "alone"
    shutil.copytree(work, alone)

    cp = _run("train", cfg_file, "--work-dir", work, "--resume", "--cfg-options", "save_steps=3", NPROC_PER_NODE=2)
    assert cp.returncode == 0, cp.stderr[-4000:]
    assert "iter_3.pth at step 3" in cp.stderr
    assert sorted(p.name for p in work.glob("*.pth")) == ["iter_3.pth", "iter_6.pth"]
    _assert_same_losses(straight, run_losses(work), range(4, STEPS + 1))

    cp = _run("train", cfg_file, "--work-dir", alone, "--resume", "--cfg-options", "save_steps=3", "batch_size=2")
    assert cp.returncode == 0, cp.stderr[-4000:]
    _assert_same_losses(straight, run_losses(alone), range(4, STEPS + 1))


@pytest.mark.slow
def test_full_fine_tuning_with_fsdp2(cfg_file, tmp_path):
    """algorithm = 'full' on 2 processes shards with FSDP2; losses match one process, and the gathered
    checkpoint converts with pth_to_hf."""
    options = ["algorithm=full", "max_steps=3", "lr=1e-4"]
    cp = _run("train", cfg_file, "--work-dir", tmp_path / "fsdp", "--cfg-options", *options, NPROC_PER_NODE=2)
    assert cp.returncode == 0, cp.stderr[-4000:]
    assert "parallel: fsdp over 2 processes" in cp.stderr
    one = _run("train", cfg_file, "--work-dir", tmp_path / "one", "--cfg-options", *options, "batch_size=2")
    assert one.returncode == 0, one.stderr[-3000:]
    _assert_same_losses(run_losses(tmp_path / "fsdp"), run_losses(tmp_path / "one"), range(1, 4))
    out = tmp_path / "converted"
    cp = _run("convert", "pth_to_hf", cfg_file, tmp_path / "fsdp" / "iter_3.pth", out, "--cfg-options", *options)
    assert cp.returncode == 0, cp.stderr[-3000:]
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    saved = load_checkpoint(tmp_path / "fsdp" / "iter_3.pth")["model"]
    key = next(k for k in saved if k.endswith("q_proj.weight"))
    assert saved[key].shape == weights[key].shape  # whole (gathered) weights, not one rank's shard
    torch.testing.assert_close(saved[key], weights[key])


@pytest.mark.slow
def test_bad_data_on_two_processes_is_one_line_and_exit_2(cfg_file, tmp_path):
    """Rank 0 fails tokenising; rank 1 stops waiting; the launcher returns the rank's exit code, one line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "there"}\n{"instruction": 5}\n', encoding="utf-8")
    cp = _run("train", cfg_file, "--work-dir", tmp_path / "w", "--cfg-options", f"data_path={bad}",
              NPROC_PER_NODE=2)
    assert cp.returncode == 2, cp.stderr[-4000:]
    errors = [line for line in cp.stderr.splitlines() if line.startswith("tunelab: error:")]
    assert len(errors) == 1 and "bad.jsonl" in errors[0], cp.stderr[-4000:]
    assert "Traceback" not in cp.stderr and "ChildFailedError" not in cp.stderr


@pytest.mark.slow
def test_deepspeed_missing_or_unknown_is_one_line_and_exit_2(cfg_file, tmp_path):
    """Acceptance 4. An importable module that raises ImportError stands for an absent DeepSpeed."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "deepspeed.py").write_text("raise ImportError(\"No module named 'deepspeed'\")\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    cp = _run("train", cfg_file, "--work-dir", tmp_path / "w", "--deepspeed", "deepspeed_zero2", **env)
    assert cp.returncode == 2
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunelab: error: --deepspeed needs DeepSpeed"), cp.stderr
    assert "pip install" in lines[0]
    cp = _run("train", cfg_file, "--work-dir", tmp_path / "w", "--deepspeed", "deepspeed_zero4", **env)
    assert cp.returncode == 2 and "not a built-in name (did you mean 'deepspeed_zero" in cp.stderr, cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()  # nothing started


def test_deepspeed_config_follows_the_tunelab_config(tmp_path):
    from tunelab.train.deepspeed_config import BUILTIN, load, offloads_optimizer, reconcile, zero_stage

    cfg = Config(pretrained_model_name_or_path="x", data_path="y", batch_size=2, accumulative_counts=8,
                 max_norm=1.0)
    for name in BUILTIN:
        ds, warnings = reconcile(load(name), cfg, 4, torch.bfloat16)
        assert warnings == [], name
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
                ds["train_batch_size"], ds["gradient_clipping"]) == (2, 8, 64, 1.0)
        assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
        assert zero_stage(ds) == int(name[len("deepspeed_zero")]) and offloads_optimizer(ds) == ("offload" in name)
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8,
                                  "gradient_clipping": 0.5, "fp16": {"enabled": True},
                                  "optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 3}}))
    ds, warnings = reconcile(load(str(custom)), cfg, 2, torch.bfloat16)
    text = "\n".join(warnings)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and "train_micro_batch_size_per_gpu=4" in text
    assert "gradient_accumulation_steps" not in text  # the same in both: no warning
    assert ds["gradient_clipping"] == 1.0 and "gradient_clipping=0.5" in text
    assert ds["fp16"]["enabled"] is False and "fp16.enabled=True" in text
    assert "optimizer" not in ds and "'optimizer' section is ignored" in text
    assert ds["train_batch_size"] == 2 * 8 * 2 and zero_stage(ds) == 3
    from tunelab.errors import UserError

    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        load(str(tmp_path / "broken.json"))


def test_launch_environment(monkeypatch):
    from tunelab.train import launch as distributed
    from tunelab.errors import UserError

    for key in (*distributed.LAUNCH_VARS, "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launch_requested()
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    assert not distributed.launch_requested()  # one process: in-process, no torchrun
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    assert distributed.launch_requested()
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("ADDR", "10.0.0.1")
    monkeypatch.setenv("PORT", "29600")
    cmd = distributed.torchrun_command(["train", "cfg.py", "--deepspeed", "deepspeed_zero2"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc_per_node=8", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
            "--master_port=29600"} <= set(cmd)
    assert cmd[-6:] == ["-m", "tunelab", "train", "cfg.py", "--deepspeed", "deepspeed_zero2"]
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert not distributed.launch_requested()  # already a torchrun worker
    monkeypatch.setenv("NPROC_PER_NODE", "two")
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(UserError, match="NPROC_PER_NODE='two'"):
        distributed.launch_requested()


def test_cache_key_follows_data_and_encoding(tiny_llama, data_dir, tmp_path):
    from tunelab.train.token_cache import cache_key

    data = tmp_path / "d.json"
    shutil.copy(data_dir / "alpaca" / "alpaca_data_first102.json", data)
    cfg = Config(pretrained_model_name_or_path=str(tiny_llama), data_path=str(data))
    key = cache_key(cfg, str(tiny_llama))
    assert cache_key(Config(pretrained_model_name_or_path=str(tiny_llama), data_path=str(data), lr=1.0),
                     str(tiny_llama)) == key  # lr does not change the tokens
    for change in ({"max_length": 100}, {"prompt_template": "qwen_chat"}, {"SYSTEM": "be brief"}, {"seed": 1}):
        other = Config(pretrained_model_name_or_path=str(tiny_llama), data_path=str(data), **change)
        assert cache_key(other, str(tiny_llama)) != key, change
    data.write_text(data.read_text(encoding="utf-8").replace("Give", "Offer", 1), encoding="utf-8")
    assert cache_key(cfg, str(tiny_llama)) != key  # the data's bytes


@pytest.mark.slow
def test_pth_to_hf_reads_a_distributed_checkpoint_folder(tiny_llama, data_dir, tmp_path):
    """A PyTorch Distributed Checkpoint folder (FSDP's sharded format) of a LoRA model converts to the same
    adapter PEFT itself would save."""
    import torch.distributed.checkpoint as dcp
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from conftest import run_cli
    from tunelab.model.load import add_lora, load_model

    cfg_path = write_config(tmp_path / "lora.py", pretrained_model_name_or_path=str(tiny_llama), algorithm="lora",
                            data_path=str(data_dir / "alpaca" / "alpaca_data_first102.json"), lora_r=4,
                            lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    cfg = Config(pretrained_model_name_or_path=str(tiny_llama), data_path="x", algorithm="lora", lora_r=4,
                 lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    model = add_lora(load_model(str(tiny_llama), dtype=torch.float32, device="cpu"), cfg, quantized=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # non-zero, so that a wrong mapping shows
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "iter_5.pth"))
    cp = run_cli("convert", "pth_to_hf", cfg_path, tmp_path / "iter_5.pth", tmp_path / "adapter")
    assert cp.returncode == 0, cp.stderr[-3000:]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(model)
    assert saved.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 4
