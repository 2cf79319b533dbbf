"""Dialogues with tool calls, from the shapes other tools publish them in, read into turns whose trained side
holds the assistant's calls and whose prompt side holds the tools' results (never trained).

* OpenAI: `messages` with assistant `tool_calls` ({"id", "type": "function", "function": {"name",
  "arguments": JSON text}}), role `tool` results, and a `tools` list of JSON-schema functions; also ms-swift's
  `tool_call` / `tool_response` roles (a call's content is {"name", "arguments"} JSON text) and `tools` given as
  JSON text.
* ShareGPT as LLaMA-Factory writes it: `function_call` turns (JSON text {"name", "arguments"}) and
  `observation` turns, with `tools` as JSON text.
* glaive (glaive-function-calling-v2): a `system` text ending in the functions' JSON, and a `chat` transcript of
  USER: / ASSISTANT: / FUNCTION RESPONSE: parts, calls written `<functioncall> {"name": .., "arguments": '..'}`.

A call's arguments must be a JSON object, every call must name a declared tool, and a tool result must follow a
call; otherwise the record is bad (BadRecord naming the message and field).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.turns import BadRecord, ToolCall, ToolResult, Turn


@dataclass
class Message:
    """One message in the common shape every format is read into first."""
    role: str  # system, user, assistant, tool
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    name: str = ""      # tool results: the tool's name
    call_id: str = ""   # tool results: the call answered


def parse_tools(value: Any, where: str = "'tools'") -> list[dict]:
    """The tools a record declares, each in OpenAI's {"type": "function", "function": {...}} shape; `value` is
    a list or its JSON text (LLaMA-Factory, ms-swift), of that shape or of bare {"name", ...} functions."""
    if value in (None, ""):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRecord(f"{where} is not valid JSON ({exc.msg})") from None
    if not isinstance(value, list):
        raise BadRecord(f"{where} must be a list of functions")
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRecord(f"{where}[{i}] must be a function with a 'name'")
        tools.append({"type": "function", "function": function})
    return tools


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def parse_arguments(value: Any, where: str) -> dict:
    """A call's arguments: a JSON object, or JSON text of one (OpenAI sends text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise BadRecord(f"{where} is not valid JSON ({exc.msg}: {value[:60]!r})") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise BadRecord(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _call_from_json(text: Any, where: str) -> ToolCall:
    """A {"name", "arguments"} call given as JSON text (LLaMA-Factory function_call, ms-swift tool_call)."""
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRecord(f"{where} is not valid JSON ({exc.msg})") from None
    calls = text if isinstance(text, list) else [text]  # LLaMA-Factory writes parallel calls as a list
    if len(calls) != 1 or not isinstance(calls[0], dict) or not isinstance(calls[0].get("name"), str):
        raise BadRecord(f"{where} must be one {{\"name\": ..., \"arguments\": {{...}}}} call")
    call = calls[0]
    return ToolCall(call["name"], parse_arguments(call.get("arguments", call.get("parameters")),
                                                  f"{where}: 'arguments'"))


def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    if isinstance(content, (dict, int, float)) and not isinstance(content, bool):
        return json.dumps(content, ensure_ascii=False)  # a tool result given as JSON
    if not isinstance(content, str):
        raise BadRecord(f"{where} must be a string")
    return content


_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
          "gpt": "assistant", "tool": "tool", "tool_response": "tool", "observation": "tool", "function": "tool",
          "ipython": "tool", "tool_call": "call", "function_call": "call"}


def openai_messages(messages: Any, role_key: str = "role", text_key: str = "content") -> list[Message]:
    """OpenAI / ms-swift / ShareGPT messages -> common messages (ms-swift and LLaMA-Factory call messages
    become assistant calls, merged into the assistant message just before them)."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord("the message list is empty or not a list")
    out: list[Message] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or role_key not in msg:
            raise BadRecord(f"message {i} has no '{role_key}'")
        role = _ROLES.get(str(msg[role_key]))
        if role is None:
            raise BadRecord(f"message {i}: unknown {role_key} '{msg[role_key]}' (expected one of "
                            f"{', '.join(_ROLES)})")
        text = _text_of(msg.get(text_key), f"message {i}: '{text_key}'")
        if role == "call":
            call = _call_from_json(msg.get(text_key), f"message {i}: '{text_key}'")
            if out and out[-1].role == "assistant":
                out[-1].calls.append(call)
            else:
                out.append(Message("assistant", "", [call]))
            continue
        calls = []
        for k, raw in enumerate(msg.get("tool_calls") or []):
            fn = raw.get("function", raw) if isinstance(raw, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise BadRecord(f"message {i}: tool_calls[{k}] has no function name")
            calls.append(ToolCall(fn["name"], parse_arguments(fn.get("arguments"),
                                                              f"message {i}: tool_calls[{k}].function.arguments"),
                                  str(raw.get("id") or "")))
        if isinstance(msg.get("function_call"), dict):  # OpenAI's older single-call field
            fn = msg["function_call"]
            calls.append(ToolCall(str(fn.get("name")), parse_arguments(fn.get("arguments"),
                                                                       f"message {i}: function_call.arguments")))
        out.append(Message(role, text, calls, str(msg.get("name") or ""), str(msg.get("tool_call_id") or "")))
    return out


def messages_to_turns(messages: list[Message], tools: list[dict], open_last: bool = False,
                      check_declared: bool = True) -> list[Turn]:
    """Pair common messages into turns: (system?) user texts or tool results -> an assistant answer and its
    calls. Consecutive user texts are joined with a newline; tool results gather into the next turn's input.
    With open_last, what follows the last answer (a user message or tool results) becomes a last turn without
    output: the prompt a model answers at chat time."""
    declared = tool_names(tools)
    turns: list[Turn] = []
    system, users, results = "", [], []
    calling = False  # the last assistant message made calls that results may answer
    for i, msg in enumerate(messages):
        if msg.role == "system":
            system = msg.content
        elif msg.role == "user":
            if results:
                raise BadRecord(f"message {i}: a user message follows tool results before the assistant answers "
                                f"them")
            users.append(msg.content)
            calling = False
        elif msg.role == "tool":
            if not calling:
                raise BadRecord(f"message {i}: a tool result with no tool call before it")
            # a result without ids answers the calls in order (LLaMA-Factory and ms-swift write none)
            answered = turns[-1].calls[min(len(results), len(turns[-1].calls) - 1)]
            results.append(ToolResult(msg.content, msg.name or answered.name, msg.call_id or answered.id))
        else:
            for k, call in enumerate(msg.calls):
                call.id = call.id or f"call_{len(turns)}_{k}"
                if call.name not in declared and check_declared:
                    known = f"the record's tools are {', '.join(declared)}" if declared else "the record declares no tools"
                    raise BadRecord(f"message {i}: calls tool '{call.name}', which is not declared ({known})")
            turns.append(Turn("\n".join(users), msg.content, system if not turns else "", list(msg.calls),
                              results))
            users, results, calling = [], [], bool(msg.calls)
    if open_last and (users or results):
        turns.append(Turn("\n".join(users), "", system if not turns else "", [], results))
    if turns:
        turns[0].tools = tools
    return turns


# --- glaive -----------------------------------------------------------------------------------------------
_GLAIVE_PART = re.compile(r"(?:^|\s)(USER|ASSISTANT|FUNCTION RESPONSE):\s?")
_GLAIVE_ARGS = re.compile(r"""("arguments"\s*:\s*)'(.*)'(\s*}\s*)$""", re.S)


def is_glaive(r: Any) -> bool:
    return isinstance(r, dict) and isinstance(r.get("chat"), str) and isinstance(r.get("system"), str) \
        and "USER:" in r["chat"]


def _glaive_tools(system: str) -> tuple[str, list[dict]]:
    """The system text before the functions' JSON, and the functions."""
    text = system.strip()
    if text.startswith("SYSTEM:"):
        text = text[len("SYSTEM:"):].strip()
    start = text.find("{")
    if start < 0:
        return text, []
    decoder, functions, pos = json.JSONDecoder(), [], start
    while pos < len(text):
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise BadRecord(f"'system': the function definitions are not valid JSON ({exc.msg})") from None
        functions.append(value)
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
    return text[:start].rstrip(" -\n"), parse_tools(functions, "'system' functions")


def _glaive_call(text: str, where: str) -> ToolCall:
    # glaive quotes the arguments object as a single-quoted string: {"name": "f", "arguments": '{"a": 1}'}
    body = text.replace("<|endoftext|>", "").strip()
    quoted = _GLAIVE_ARGS.search(body)
    if quoted:
        body = body[:quoted.start()] + quoted.group(1) + json.dumps(quoted.group(2)) + quoted.group(3)
    return _call_from_json(body, where)


def glaive(record: dict) -> list[Turn]:
    system, tools = _glaive_tools(record["system"])
    parts = _GLAIVE_PART.split(record["chat"])
    messages = [Message("system", system)] if system else []
    for n, (speaker, text) in enumerate(zip(parts[1::2], parts[2::2])):
        text = text.replace("<|endoftext|>", "").strip()
        if speaker == "USER":
            messages.append(Message("user", text))
        elif speaker == "FUNCTION RESPONSE":
            messages.append(Message("tool", text))
        elif "<functioncall>" in text:
            before, _, call = text.partition("<functioncall>")
            messages.append(Message("assistant", before.strip(), [_glaive_call(call, f"'chat' part {n + 1}")]))
        else:
            messages.append(Message("assistant", text))
    if not messages:
        raise BadRecord("no 'USER: ... ASSISTANT: ...' exchange in 'chat'")
    return messages_to_turns(messages, tools)
