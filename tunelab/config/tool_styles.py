"""How each chat format writes tools, tool calls and tool results, and how a model's reply is read back into
calls. A prompt template (tunelab.config.templates) renders plain turns; when a dialogue declares tools, its
template's ToolStyle adds the parts that have no slot in the plain layout:

* generic (Qwen2.5 / Qwen3 / Hermes, and every template without a format of its own): the functions as JSON
  lines in a `# Tools` section of the system text, calls as `<tool_call>\\n{"name", "arguments"}\\n</tool_call>`
  blocks after the answer text, results as `<tool_response>` blocks in a user turn;
* llama31 (Llama 3.1 JSON tool calling): `Environment: ipython` and the knowledge dates in the system text, the
  functions (indented JSON) in the first user message, a call as `{"name", "parameters"}` JSON, results in
  `ipython` turns (as JSON text);
* mistral / mistral_tekken (Mistral v0.3, Nemo): `[AVAILABLE_TOOLS]` before the first `[INST]`, calls as
  `[TOOL_CALLS] [...]` with 9-character ids, results as `[TOOL_RESULTS] {"content", "call_id"}[/TOOL_RESULTS]`;
* internlm2 (InternLM2 chat_format.md): a `system name=<|plugin|>` block listing the functions, calls as
  `<|action_start|><|plugin|>\\n{"name", "parameters"}<|action_end|>`, results in `environment name=<|plugin|>`
  turns.

Calls and results are read duck-typed (`.name`, `.arguments`, `.id`; `.content`, `.call_id`) so that this
layer needs nothing from the data layer; `parse` returns plain {"name", "arguments"} dicts.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_HERMES_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                "with function signatures within <tools></tools> XML tags:\n<tools>")
_HERMES_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
_LLAMA_DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
_LLAMA_ASK = ("Given the following functions, please respond with a JSON for a function call with its proper "
              "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
              "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n")


def dumps(value: Any, **kw) -> str:
    """JSON as chat templates write it (transformers' `tojson`): non-ASCII kept, ', ' and ': ' separators."""
    return json.dumps(value, ensure_ascii=False, **kw)


def _objects(text: str) -> list[tuple[int, int, Any]]:
    """(start, end, value) of each JSON object or array that starts somewhere in text, left to right."""
    decoder, found, pos = json.JSONDecoder(), [], 0
    while True:
        starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
        if not starts:
            return found
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        found.append((start, end, value))
        pos = end


def _as_call(value: Any) -> dict | None:
    """{"name", "arguments"} from a call object that writes its arguments as 'arguments' or 'parameters'."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {"name": value["name"], "arguments": args} if isinstance(args, dict) else None


class ToolStyle:
    """The generic style (Qwen2.5 / Qwen3 / Hermes). Subclasses override what their format writes otherwise."""
    name = "generic"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def system(self, system: str, tools: list[dict]) -> str:
        """The system text, with the tools where this format lists them."""
        block = _HERMES_HEAD + "".join("\n" + dumps(t) for t in tools) + _HERMES_TAIL
        return f"{system}\n\n{block}" if system else block

    def before_first(self, tools: list[dict]) -> str:
        """Prompt text between the system block and the first instruction."""
        return ""

    def first_input(self, text: str, tools: list[dict]) -> str:
        """The first user message, with the tools where this format lists them."""
        return text

    def output(self, content: str, calls: list) -> str:
        """The assistant's answer text followed by its calls."""
        blocks = [f"<tool_call>\n{{\"name\": {dumps(c.name)}, \"arguments\": {dumps(c.arguments)}}}\n</tool_call>"
                  for c in calls]
        return "\n".join(([content] if content else []) + blocks)

    def results(self, results: list, instruction: str) -> str:
        """The prompt of a turn that brings tool results; `instruction` is the template's user instruction
        (its {round} filled in)."""
        text = "\n".join(f"<tool_response>\n{r.content}\n</tool_response>" for r in results)
        return instruction.replace("{input}", text)

    def parse(self, text: str) -> tuple[str, list[dict]]:
        """A model's reply -> (answer text, calls); text that does not read as a call stays answer text."""
        calls, kept, pos = [], [], 0
        for m in self._CALL.finditer(text):
            call = next((c for c in (_as_call(v) for _, _, v in _objects(m.group(1))) if c), None)
            if call is None:
                continue
            calls.append(call)
            kept.append(text[pos:m.start()])
            pos = m.end()
        return ("".join(kept) + text[pos:]).strip(), calls


class Llama31Style(ToolStyle):
    name = "llama31"

    def system(self, system: str, tools: list[dict]) -> str:
        return "Environment: ipython\n" + _LLAMA_DATES + system.strip()

    def first_input(self, text: str, tools: list[dict]) -> str:
        return _LLAMA_ASK + "".join(dumps(t, indent=4) + "\n\n" for t in tools) + text.strip()

    def output(self, content: str, calls: list) -> str:
        # the published template writes one call per message and no text beside it; tunelab keeps both
        lines = [f"{{\"name\": {dumps(c.name)}, \"parameters\": {dumps(c.arguments)}}}" for c in calls]
        return "\n".join(([content] if content else []) + lines)

    def results(self, results: list, instruction: str) -> str:
        return "".join(f"<|start_header_id|>ipython<|end_header_id|>\n\n{dumps(r.content)}<|eot_id|>"
                       for r in results) + "<|start_header_id|>assistant<|end_header_id|>\n\n"

    def parse(self, text: str) -> tuple[str, list[dict]]:
        calls, kept, pos = [], [], 0
        for start, end, value in _objects(text):
            call = _as_call(value)
            if call is not None and ("parameters" in value or "arguments" in value):
                calls.append(call)
                kept.append(text[pos:start])
                pos = end
        return ("".join(kept) + text[pos:]).strip(), calls


class MistralStyle(ToolStyle):
    name = "mistral"
    gap = " "  # v0.3 writes '[TOOL_CALLS] [', Nemo's tekken '[TOOL_CALLS]['

    def system(self, system: str, tools: list[dict]) -> str:
        return system

    @staticmethod
    def call_id(given: str) -> str:
        """The 9-character alphanumeric id Mistral's format requires, stable for a given id."""
        if re.fullmatch(r"[A-Za-z0-9]{9}", given or ""):
            return given
        return hashlib.sha1((given or "").encode()).hexdigest()[:9]

    def before_first(self, tools: list[dict]) -> str:
        items = []
        for tool in tools:
            # the published template writes string values raw and the rest as JSON, key by key
            fields = [f'"{k}": "{v}"' if isinstance(v, str) else f'"{k}": {dumps(v)}'
                      for k, v in tool["function"].items() if k != "return"]
            items.append('{"type": "function", "function": {' + ", ".join(fields) + "}}")
        return f"[AVAILABLE_TOOLS]{self.gap}[" + ", ".join(items) + "][/AVAILABLE_TOOLS]"

    def output(self, content: str, calls: list) -> str:
        items = [dumps({"name": c.name, "arguments": c.arguments})[:-1] + f', "id": "{self.call_id(c.id)}"}}'
                 for c in calls]
        return content + f"[TOOL_CALLS]{self.gap}[" + ", ".join(items) + "]"

    def results(self, results: list, instruction: str) -> str:
        return "".join(f'[TOOL_RESULTS]{self.gap}{{"content": {r.content}, "call_id": "{self.call_id(r.call_id)}"}}'
                       f"[/TOOL_RESULTS]" for r in results)

    def parse(self, text: str) -> tuple[str, list[dict]]:
        head, marker, rest = text.partition("[TOOL_CALLS]")
        if not marker:
            return text.strip(), []
        found = _objects(rest)
        values = found[0][2] if found else None
        calls = [c for c in (_as_call(v) for v in (values if isinstance(values, list) else [values])) if c]
        return (head.strip(), calls) if calls else (text.strip(), [])


class MistralTekkenStyle(MistralStyle):
    name = "mistral_tekken"
    gap = ""


class InternLM2Style(ToolStyle):
    name = "internlm2"
    _CALL = re.compile(r"<\|action_start\|><\|plugin\|>\s*(.*?)<\|action_end\|>", re.S)

    def system(self, system: str, tools: list[dict]) -> str:
        return system

    def before_first(self, tools: list[dict]) -> str:
        functions = dumps([t["function"] for t in tools], indent=4)
        return f"<|im_start|>system name=<|plugin|>\n{functions}\n<|im_end|>\n"

    def output(self, content: str, calls: list) -> str:
        return content + "".join(f"<|action_start|><|plugin|>\n{dumps({'name': c.name, 'parameters': c.arguments})}"
                                 f"<|action_end|>" for c in calls)

    def results(self, results: list, instruction: str) -> str:
        return "\n".join(f"<|im_start|>environment name=<|plugin|>\n{r.content}<|im_end|>" for r in results) \
            + "\n<|im_start|>assistant\n"


STYLES = {s.name: s for s in (ToolStyle(), Llama31Style(), MistralStyle(), MistralTekkenStyle(), InternLM2Style())}
# template name -> its tool style; every other template writes the generic one
TEMPLATE_STYLES = {"llama3_chat": "llama31", "mistral_v3": "mistral", "mistral_tekken": "mistral_tekken",
                   "internlm2_chat": "internlm2"}


def tool_style(template_name: str) -> ToolStyle:
    """The ToolStyle a template writes tools in ('auto': the generic one, whose parse reads Hermes calls)."""
    return STYLES[TEMPLATE_STYLES.get(template_name, "generic")]


def parse_any(text: str) -> tuple[str, list[dict]]:
    """A reply in whichever known format holds calls (for 'auto', where the format is the tokenizer's own)."""
    for style in (STYLES["generic"], STYLES["internlm2"], STYLES["mistral"], STYLES["llama31"]):
        content, calls = style.parse(text)
        if calls:
            return content, calls
    return text.strip(), []
