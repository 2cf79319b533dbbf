"""`tunelab chat`: multi-turn chat with a base model + adapter, a merged model, or an adapter folder alone.

The prompt template defaults to the one the adapter/model was trained with (tunelab.json beside it), and
prompts are encoded by the same code as training data, so chat sees exactly what training taught."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.data.encode import PromptFormat
from tunelab.data.formats import Turn
from tunelab.errors import UserError
from tunelab.model.generate import Sampling, generate
from tunelab.model.load import (load_model, load_tokenizer, read_metadata, resolve_dtype, resolve_model_path)


@dataclass
class ChatOptions:
    model: str
    adapter: str | None = None
    prompt_template: str | None = None
    system: str | None = None
    bits: int | None = None
    torch_dtype: str = "auto"
    stop_words: list[str] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    streamer: bool = True
    seed: int = 0
    trust_remote_code: bool = False


def _adapter_base(adapter: Path) -> str:
    import json

    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_chat_model(opts: ChatOptions):
    """(model, tokenizer, PromptFormat) as the options say."""
    model_path = resolve_model_path(opts.model, "MODEL")
    adapter = Path(opts.adapter) if opts.adapter else None
    if adapter is None and (Path(model_path) / "adapter_config.json").is_file():
        adapter, model_path = Path(model_path), resolve_model_path(_adapter_base(Path(model_path)), "base model")
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise UserError(f"--adapter '{opts.adapter}': no adapter_config.json there; give the folder written "
                        f"by `tunelab convert pth_to_hf` (or work_dirs/<config>/hf)")
    meta = {**read_metadata(model_path), **(read_metadata(adapter) if adapter else {})}
    tok_dir = adapter if adapter and (adapter / "tokenizer_config.json").is_file() else Path(model_path)
    tokenizer = load_tokenizer(str(tok_dir), opts.trust_remote_code)
    template = opts.prompt_template or meta.get("prompt_template") or (
        "auto" if getattr(tokenizer, "chat_template", None) else "default")
    system = opts.system if opts.system is not None else meta.get("SYSTEM", "")
    try:
        fmt = PromptFormat(tokenizer, template, system)
    except ValueError as exc:
        raise UserError(f"--prompt-template: {exc}") from None
    dtype = resolve_dtype(opts.torch_dtype)
    model = load_model(model_path, dtype=dtype, bits=opts.bits, trust_remote_code=opts.trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tokenizer, fmt


def chat(opts: ChatOptions, stdin=None, stdout=None) -> int:
    """Read a message per line; RESET clears the history, EXIT (or end of input) quits."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tokenizer, fmt = load_chat_model(opts)
    stop_words = fmt.stop_words + [w for w in opts.stop_words if w]
    interactive = stdin.isatty()
    history: list[Turn] = []
    while True:
        if interactive:
            stdout.write("\n>>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "EXIT":
            break
        if text.strip() == "RESET":
            history = []
            stdout.write("(history cleared)\n")
            stdout.flush()
            continue
        if not text.strip():
            continue
        torch.manual_seed(opts.seed)
        turns = history + [Turn(text, "")]
        ids, _ = fmt.encode(turns, open_last=True)

        def show(piece: str) -> None:
            stdout.write(piece)
            stdout.flush()

        answer = generate(model, tokenizer, ids, stop_words, opts.sampling, show if opts.streamer else None)
        if not opts.streamer:
            stdout.write(answer)
        stdout.write("\n")
        stdout.flush()
        history = turns[:-1] + [Turn(text, answer)]
    return 0
