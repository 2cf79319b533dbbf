"""`tunelab chat`: multi-turn chat with a base model + adapter, a merged model, or an adapter folder alone;
optionally with MOSS-style plugins (--with-plugins) or as a ReAct agent (--lagent).

The prompt template defaults to the one the adapter/model was trained with (tunelab.json beside it), and
prompts are encoded by the same code as training data, so chat sees exactly what training taught."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tunelab.data.encode import PromptFormat
from tunelab.data.formats import Turn
from tunelab.data.turns import ToolResult
from tunelab.errors import UserError
from tunelab.model.generate import Sampling, generate, generate_until
from tunelab.model.load import (check_adapter_fits, load_model, load_tokenizer, read_metadata, resolve_dtype,
                                resolve_model_path)


@dataclass
class ChatOptions:
    model: str
    adapter: str | None = None
    prompt_template: str | None = None
    system: str | None = None
    system_template: str | None = None
    bits: int | None = None
    torch_dtype: str = "auto"
    stop_words: list[str] = field(default_factory=list)
    command_stop_word: str | None = None   # plugins: where the model's commands end (default <eoc>)
    answer_stop_word: str | None = None    # an extra end-of-answer word (the template's are always used)
    sampling: Sampling = field(default_factory=Sampling)
    streamer: bool = True
    seed: int = 0
    trust_remote_code: bool = False
    bot_name: str = "BOT"
    plugins: list[str] = field(default_factory=list)  # --with-plugins
    lagent: bool = False
    offload_folder: str | None = None
    tools: str | None = None  # --tools: a JSON file of function definitions the model may call


def _adapter_base(adapter: Path) -> str:
    import json

    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def _mode_system(opts: ChatOptions) -> str:
    """The system text of the chosen mode, used when neither the user nor the training run gives one."""
    if opts.lagent:
        from tunelab.chat.agent import agent_system_prompt

        return agent_system_prompt(opts.plugins or _all_tools())
    if opts.plugins:
        from tunelab.tools.plugins import plugin_system_prompt

        return plugin_system_prompt(opts.plugins, opts.bot_name)
    return ""


def _all_tools() -> list[str]:
    from tunelab.tools import TOOLS

    return list(TOOLS)


def choose_system(opts: ChatOptions, meta: dict) -> str:
    """--system, else --system-template, else the training run's SYSTEM, else the mode's own prompt."""
    if opts.system is not None and opts.system_template:
        raise UserError("give --system or --system-template, not both")
    if opts.system is not None:
        text = opts.system
    elif opts.system_template:
        from tunelab.chat.system_templates import get_system_template
        from tunelab.tools.plugins import plugin_system_prompt

        try:
            text = (plugin_system_prompt(opts.plugins) if opts.system_template == "moss_sft"
                    else get_system_template(opts.system_template))
        except ValueError as exc:
            raise UserError(f"--system-template: {exc}") from None
    else:
        text = meta.get("SYSTEM") or _mode_system(opts)
    return text.replace("{bot_name}", opts.bot_name)


def load_chat_model(opts: ChatOptions):
    """(model, tokenizer, PromptFormat) as the options say."""
    model_path = resolve_model_path(opts.model, "MODEL")
    adapter = Path(opts.adapter) if opts.adapter else None
    if adapter is None and (Path(model_path) / "adapter_config.json").is_file():
        adapter, model_path = Path(model_path), resolve_model_path(_adapter_base(Path(model_path)), "base model")
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise UserError(f"--adapter '{opts.adapter}': no adapter_config.json there; give the folder written "
                        f"by `tunelab convert pth_to_hf` (or work_dirs/<config>/hf)")
    if adapter is not None:
        check_adapter_fits(model_path, adapter, opts.trust_remote_code)
    meta = {**read_metadata(model_path), **(read_metadata(adapter) if adapter else {})}
    tok_dir = adapter if adapter and (adapter / "tokenizer_config.json").is_file() else Path(model_path)
    tokenizer = load_tokenizer(str(tok_dir), opts.trust_remote_code)
    trained = meta.get("prompt_template")
    if opts.prompt_template and trained and opts.prompt_template != trained:
        print(f"warning: --prompt-template {opts.prompt_template} differs from '{trained}', the template this "
              f"model was trained with; answers may not stop or may be off (leave the flag out to use "
              f"'{trained}')", file=sys.stderr)
    template = opts.prompt_template or trained or (
        "auto" if getattr(tokenizer, "chat_template", None) else "default")
    system = choose_system(opts, meta)
    try:
        fmt = PromptFormat(tokenizer, template, system)
    except ValueError as exc:
        raise UserError(f"--prompt-template: {exc}") from None
    dtype = resolve_dtype(opts.torch_dtype)
    extra = {}
    if opts.offload_folder:  # weights that do not fit on the device go there (only with a device map)
        Path(opts.offload_folder).mkdir(parents=True, exist_ok=True)
        extra["offload_folder"] = opts.offload_folder
    model = load_model(model_path, dtype=dtype, bits=opts.bits, trust_remote_code=opts.trust_remote_code, **extra)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tokenizer, fmt


def _plain_reply(model, tokenizer, fmt, opts, stop_words, show) -> Callable[[str, list[Turn]], list[Turn]]:
    def reply(text: str, history: list[Turn]) -> list[Turn]:
        turns = history + [Turn(text, "")]
        ids, _ = fmt.encode(turns, open_last=True)
        answer = generate(model, tokenizer, ids, stop_words, opts.sampling, show if opts.streamer else None)
        if not opts.streamer:
            show(answer)
        show("\n")
        return turns[:-1] + [Turn(text, answer)]
    return reply


def _plugin_reply(model, tokenizer, fmt, opts, stop_words, show) -> Callable[[str, list[Turn]], list[Turn]]:
    """Generate to the command stop word, run the commands, append their results, generate the answer."""
    from tunelab.tools.plugins import COMMAND_STOP, find_commands, results_block

    command_stop = opts.command_stop_word or COMMAND_STOP
    first_stops = [command_stop] + [w for w in stop_words if w != command_stop]
    answer_stops = [w for w in stop_words if w != command_stop]
    stream = show if opts.streamer else None

    def reply(text: str, history: list[Turn]) -> list[Turn]:
        turns = history + [Turn(text, "")]
        ids, _ = fmt.encode(turns, open_last=True)
        said, hit = generate_until(model, tokenizer, ids, first_stops, opts.sampling, stream)
        if not opts.streamer:
            show(said)
        commands = find_commands(said) if hit == command_stop else []
        if commands:
            extension = command_stop + results_block(commands, opts.plugins)
            show(extension)
            prefix = said + extension
            more_ids = tokenizer.encode(prefix, add_special_tokens=False)
            answer = generate(model, tokenizer, ids + more_ids, answer_stops, opts.sampling, stream)
            if not opts.streamer:
                show(answer)
            said = prefix + answer
        show("\n")
        return turns[:-1] + [Turn(text, said)]
    return reply


MAX_TOOL_ROUNDS = 6


def read_tools(path: str) -> list[dict]:
    """--tools FILE: a JSON list of functions (OpenAI's {"type": "function", "function": {...}} or bare)."""
    import json

    from tunelab.data.tool_records import parse_tools
    from tunelab.data.turns import BadRecord

    try:
        return parse_tools(json.loads(Path(path).read_text(encoding="utf-8")), f"--tools {path}")
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--tools {path}: cannot read a JSON list of functions ({exc})") from None
    except BadRecord as exc:
        raise UserError(str(exc)) from None


def _tool_reply(model, tokenizer, fmt, opts, stop_words, show, tools, read_line):
    """Answer with tools offered, in the template's tool format: each call the model makes is shown, and the
    next input line is taken as its result, until the model answers without a call."""
    import json

    def reply(text: str, history: list[Turn]) -> list[Turn]:
        turns = history + [Turn(text, "")]
        turns[0].tools = tools
        for _ in range(MAX_TOOL_ROUNDS):
            ids, _ = fmt.encode(turns, open_last=True)
            content, calls = fmt.parse_reply(generate(model, tokenizer, ids, stop_words, opts.sampling, None))
            last = turns[-1]
            turns[-1] = Turn(last.input, content, last.system, calls, last.results, last.tools)
            show(content)
            if not calls:
                break
            results = []
            for k, call in enumerate(calls):
                call.id = f"call_{len(turns)}_{k}"
                show(f"\n[tool call] {call.name} {json.dumps(call.arguments, ensure_ascii=False)}\nresult> ")
                results.append(ToolResult(read_line().rstrip("\n"), call.name, call.id))
            turns.append(Turn("", "", results=results))
        show("\n")
        return turns
    return reply


def chat(opts: ChatOptions, stdin=None, stdout=None) -> int:
    """Read a message per line; RESET clears the history, EXIT (or end of input) quits."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if opts.plugins:
        from tunelab.tools import check_tool_names

        try:
            opts.plugins = check_tool_names(opts.plugins)
        except ValueError as exc:
            raise UserError(f"--with-plugins: {exc}") from None
    tools = read_tools(opts.tools) if opts.tools else []  # a bad file is reported before the model loads
    model, tokenizer, fmt = load_chat_model(opts)
    stop_words = list(dict.fromkeys(fmt.stop_words + [w for w in opts.stop_words + [opts.answer_stop_word] if w]))
    interactive = stdin.isatty()

    def show(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    if opts.lagent:
        from tunelab.chat.agent import ReActAgent, run_agent_turn

        agent = ReActAgent(model, tokenizer, fmt, opts.plugins or _all_tools(), opts.sampling, stop_words,
                           show=show, stream=opts.streamer)

        def reply(text: str, history: list[Turn]) -> list[Turn]:
            return run_agent_turn(agent, text, history, opts.seed)[1]
    elif opts.tools:
        reply = _seeded(_tool_reply(model, tokenizer, fmt, opts, stop_words, show, tools, stdin.readline), opts.seed)
    elif opts.plugins:
        reply = _seeded(_plugin_reply(model, tokenizer, fmt, opts, stop_words, show), opts.seed)
    else:
        reply = _seeded(_plain_reply(model, tokenizer, fmt, opts, stop_words, show), opts.seed)

    history: list[Turn] = []
    if interactive:
        show("Type a message and press Enter; RESET clears the history, EXIT (or Ctrl-D) quits.\n")
    while True:
        if interactive:
            show("\n>>> ")
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "EXIT":
            break
        if text.strip() == "RESET":
            history = []
            show("(history cleared)\n")
            continue
        if not text.strip():
            continue
        if interactive:
            show(f"{opts.bot_name}: ")
        history = reply(text, history)
    return 0


def _seeded(reply, seed: int):
    """Each message starts from the same sampling seed, so a conversation replays identically."""
    def seeded(text: str, history: list[Turn]) -> list[Turn]:
        torch.manual_seed(seed)
        return reply(text, history)
    return seeded
