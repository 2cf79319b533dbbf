"""Running one benchmark side in its own process (bench/speed.py, bench/dpo_speed.py): the side prints one
`RESULT {json}` line; a side that fails or times out gets the tail of its output printed and an error row."""
from __future__ import annotations

import json
import subprocess


def run_in_own_process(cmd: list[str], timeout: float, label: str, **row) -> dict:
    """The side's RESULT, or `row` with the error (the output's last line) where it printed none."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = f"timed out after {timeout}s\n{(exc.stderr or b'')[-2000:]}"
    result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        tail = "\n".join(out.strip().splitlines()[-25:])
        print(f"--- {label} failed:\n{tail}", flush=True)
        result = dict(row, error=out.strip().splitlines()[-1][:200] if out.strip() else "?")
    return result


def hf_attention(path: str) -> str:
    """The Hugging Face attention of the HF/TRL sides: sdpa, or the one tunelab loads the model with where it
    must be another (Gemma 2's softcapped attention: eager, since transformers 5.17's sdpa skipped the cap)."""
    from transformers import AutoConfig

    from tunelab.model.load import attention_implementation
    return attention_implementation(AutoConfig.from_pretrained(path)) or "sdpa"
