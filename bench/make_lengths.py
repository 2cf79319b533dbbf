"""Write bench/sample_lengths.json: the token length of every sample of the MedQA2019 train file and the
1,000-record alpaca file, encoded the way `tunelab train` encodes them (internlm2_chat template, the tiny
byte-level BPE tokenizer: no Llama tokenizer is available offline, so lengths run somewhat longer than a
Llama-2 tokenizer would give). Run here (CPU) before a benchmark call; the GPU machine has no ../shared."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tunelab.config.loader import load_config
from tunelab.data.dataset import DataStats, encode_sample, load_dialogues
from tunelab.data.encode import PromptFormat
from tunelab.model.tiny import build_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {"medqa2019": DATA / "medqa2019" / "MedQA2019-structured-train.jsonl",
         "alpaca": DATA / "alpaca" / "alpaca_data_cleaned_1000.json"}


def main() -> None:
    tokenizer = build_tokenizer()
    out = {}
    for name, path in FILES.items():
        cfg = load_config("demo", [f"data_path={str(path)!r}", "prompt_template='internlm2_chat'",
                                   "max_length=2048"])[0]
        fmt = PromptFormat(tokenizer, cfg.prompt_template)
        lengths = []
        for _, turns in load_dialogues(cfg, DataStats()):
            seq = encode_sample(fmt, turns, cfg.max_length)[0]
            if seq is not None:
                lengths.append(len(seq))
        out[name] = lengths
        print(f"{name}: {len(lengths)} samples, mean {sum(lengths) / len(lengths):.0f} tokens, "
              f"max {max(lengths)}", file=sys.stderr)
    Path(__file__).with_name("sample_lengths.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
