"""`tunelab train` as a tutorial user runs it, on the Llama-2-7B shape (bench/shape_model.py, random weights):
the tutorial's config `internlm_chat_7b_qlora_oasst1_e3` copied, its model and data lines edited, options on
the command line. Two parts, each one device call:

    python bench/real_runs.py runs    # the three runs of issue 27 (and the plain path's first step beside them)
    python bench/real_runs.py speed [DATA:ALGORITHM,...]   # real data against bench/speed.py at the same row width
                                                          # (default: medqa and alpaca, each with qlora and lora)

`runs`: (1) 12 steps of 1,024-token packed MedQA rows with accumulation 4 and a checkpoint every 4 steps,
(2) 40 steps with the config's evaluation prompts every 20, (3) `--resume` on (2) once it finished; plus (1)'s
first step on the plain path (fast_path off), whose loss (1)'s first must equal within bf16 tolerance.
`speed`: the config as it is (QLoRA, and LoRA by `algorithm=lora`; 2,048-token packed rows, accumulation 16,
LoRA dropout 0.1) on MedQA2019 and alpaca at their real lengths: real tokens/s (padding not counted) as the run
logged it, over steps 4-8 (captures happen in the first), beside bench/speed.py's tunelab side
with the same LoRA settings on random 2,048-token rows.

Data come from BENCH_DATA (default ../shared/data); the model is made in BENCH_MODEL_DIR once. With $OUT set,
the logs and a JSON of the results are written there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("BENCH_DATA", HERE.parent.parent / "shared" / "data"))
MODEL = Path(os.environ.get("BENCH_MODEL_DIR", "/tmp/llama2_7b_shape"))
OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
CONFIG = "internlm_chat_7b_qlora_oasst1_e3"
MEDQA = DATA / "medqa2019" / "MedQA2019-structured-train.jsonl"
ALPACA = DATA / "alpaca" / "alpaca_data_cleaned_1000.json"


def copied_config(folder: Path, data: Path) -> Path:
    """The tutorial's config copied and given its two edits (model and data path)."""
    subprocess.run([sys.executable, "-m", "tunelab", "copy-cfg", CONFIG, str(folder)], check=True, capture_output=True)
    cfg = folder / f"{CONFIG}_copy.py"
    lines = cfg.read_text(encoding="utf-8").splitlines()
    edits = {"pretrained_model_name_or_path": str(MODEL), "data_path": str(data)}
    cfg.write_text("\n".join(f"{line.split(' = ')[0]} = {edits[line.split(' = ')[0]]!r}"
                             if line.split(" = ")[0] in edits else line for line in lines) + "\n", encoding="utf-8")
    return cfg


def train(name: str, cfg: Path, work: Path, *args: str) -> dict:
    """One `tunelab train` process; its exit code, logged steps and what it said about the fast path."""
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--work-dir", str(work), *args],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log = proc.stdout + proc.stderr
    if OUT:
        (OUT / f"{name}.log").write_text(log)
    records = [json.loads(line) for f in sorted(work.glob("*/vis_data/scalars.json"))
               for line in f.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return dict(name=name, exit=proc.returncode, wall_s=round(time.time() - t), steps=steps,
                captured=log.count("captured a CUDA graph"), capture_failures=log.count("capture failed"),
                traceback="Traceback" in log, last_line=log.strip().splitlines()[-1][-200:] if log.strip() else "")


def runs() -> list[dict]:
    folder = Path(tempfile.mkdtemp(prefix="real_runs_"))
    cfg = copied_config(folder, MEDQA)
    first = ["max_length=1024", "prompt_template=auto", "log_interval=1", "accumulative_counts=4"]
    one = first + ["max_steps=12", "evaluation_inputs=[]", "save_steps=4"]
    two = first + ["max_steps=40", "evaluation_freq=20", "save_steps=20"]
    with ThreadPoolExecutor(2) as pool:  # the plain path's first step beside run 1 (the GPU holds both)
        plain = pool.submit(train, "plain_first_step", cfg, folder / "plain", "--cfg-options", *one[:-1],
                            "max_steps=1", "fast_path=off")
        results = [train("run1_steps12", cfg, folder / "one", "--cfg-options", *one)]
        results.append(plain.result())
    results.append(train("run2_steps40_eval", cfg, folder / "two", "--cfg-options", *two))
    results.append(train("run3_resume_after_end", cfg, folder / "two", "--resume", "--cfg-options", *two))
    fast, slow = results[0]["steps"], results[1]["steps"]
    if fast and slow:
        results[0]["first_loss_plain"] = slow[0]["loss"]
        results[0]["first_loss_rel_diff"] = abs(fast[0]["loss"] - slow[0]["loss"]) / abs(slow[0]["loss"])
    print("| run | exit | steps logged | first loss | graphs captured | capture failures | traceback | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        loss = f"{r['steps'][0]['loss']:.4f}" if r["steps"] else "-"
        print(f"| {r['name']} | {r['exit']} | {len(r['steps'])} | {loss} | {r['captured']} | {r['capture_failures']} "
              f"| {r['traceback']} | {r['wall_s']} |")
    if "first_loss_rel_diff" in results[0]:
        fast_loss, plain_loss = results[0]["steps"][0]["loss"], results[0]["first_loss_plain"]
        print(f"first step, fast vs plain: {fast_loss:.5f} vs {plain_loss:.5f} "
              f"(relative difference {results[0]['first_loss_rel_diff']:.2e})")
    return results


def speed(runs: str) -> list[dict]:
    folder = Path(tempfile.mkdtemp(prefix="real_speed_"))
    results = []
    for run in runs.split(","):
        data_name, algorithm = run.split(":")
        cfg = copied_config(folder / run.replace(":", "_"), {"medqa": MEDQA, "alpaca": ALPACA}[data_name])
        name = f"train_{data_name}_{algorithm}"
        r = train(name, cfg, folder / name, "--cfg-options", f"algorithm={algorithm}", "max_steps=8",
                  "evaluation_inputs=[]", "save_steps=1000", "log_interval=1")
        timed = [s for s in r["steps"] if s["step"] > 3]
        r.update(algorithm=algorithm, data=data_name,
                 tok_s=sum(s["tokens_per_s"] for s in timed) / len(timed) if timed else None)
        results.append(r)
    # bench/speed.py's tunelab sides at 2,048 tokens: all 32 layers recomputed, inputs on the host (what
    # offload_checkpoints 'auto' chose for the runs above), LoRA dropout 0.1 as in the tutorial's config
    proc = subprocess.run([sys.executable, str(HERE / "speed.py"), "--model-dir", str(MODEL), "--dropout", "0.1",
                           "--warmup", "3", "--steps", "8", "--sides", "lora2k=tunelab@32h,qlora2k=tunelab_qlora@32h"],
                          capture_output=True, text=True)
    bench = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            bench["qlora" if "qlora" in row["side"] else "lora"] = row.get("tok_s")
    if OUT:
        (OUT / "speed_bench.log").write_text(proc.stdout + proc.stderr)
    print("| run | data | algorithm | real tokens/s (tunelab train) | bench/speed.py tokens/s | share | "
          "captures | capture failures |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ref = bench.get(r["algorithm"])
        share = f"{r['tok_s'] / ref:.1%}" if r["tok_s"] and ref else "-"
        print(f"| {r['name']} | {r['data']} | {r['algorithm']} | {r['tok_s'] or 0:,.0f} | {ref or 0:,.0f} | {share} | "
              f"{r['captured']} | {r['capture_failures']} |")
    results.append({"bench": bench})
    return results


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else ""
    if part not in ("runs", "speed"):
        sys.exit("usage: python bench/real_runs.py runs|speed")
    if not (MODEL / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE / "shape_model.py"), str(MODEL), "--shape", "7b"], check=True)
    out = runs() if part == "runs" else speed(
        sys.argv[2] if len(sys.argv) > 2 else "medqa:qlora,medqa:lora,alpaca:qlora,alpaca:lora")
    if OUT:
        (OUT / f"real_{part}.json").write_text(json.dumps(out, indent=1, default=str))
