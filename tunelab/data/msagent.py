"""MSAgent-Bench records (ReAct tool use): `conversations` whose assistant messages carry tool calls between
<|startofthink|> markers and their results between <|startofexec|> markers, or ReAct text; read into turns in which
tool results are never trained."""
from __future__ import annotations

import json
import re
from typing import Any

from tunelab.data.turns import BadRecord, Turn

_CALL_OR_RESULT = re.compile(r"<\|startofthink\|>(.*?)<\|endofthink\|>|<\|startofexec\|>(.*?)<\|endofexec\|>", re.S)
_FENCE = re.compile(r"^\s*```[A-Za-z]*:?\s*(.*?)\s*```\s*$", re.S)
_REACT_CALL = re.compile(r"^Action:[^\n]*\n\s*Action Input:", re.M)
_REACT_WORD = re.compile(r"^(?:Thought|Action|Action Input|Observation|Final Answer):", re.M)
_OBSERVATION = re.compile(r"^Observation:.*?(?=^(?:Thought|Action|Final Answer):|\Z)", re.S | re.M)


def is_msagent(r: Any) -> bool:
    """ShareGPT-like, but an assistant message holds MSAgent markers or a ReAct `Action:`/`Action Input:` call."""
    said = [m.get("value") for m in (r.get("conversations") if isinstance(r, dict) else None) or []
            if isinstance(m, dict) and m.get("from") == "assistant"]
    return any(isinstance(v, str) and ("<|startofthink|>" in v or "<|startofexec|>" in v or _REACT_CALL.search(v))
               for v in said)


def _unfence(text: str) -> str:
    match = _FENCE.match(text)
    return (match.group(1) if match else text).strip()


def _tool_call(block: str) -> str:
    try:
        call = json.loads(_unfence(block))
    except json.JSONDecodeError as exc:
        raise BadRecord(f"the tool call in <|startofthink|> is not valid JSON ({exc.msg})") from None
    if not isinstance(call, dict) or not isinstance(call.get("api_name"), str):
        raise BadRecord("the tool call in <|startofthink|> has no string 'api_name'")
    # the 'url' of MSAgent-Bench calls is the tool's deployment address, not something the model should learn
    return f"Action: {call['api_name']}\nAction Input: {json.dumps(call.get('parameters', {}), ensure_ascii=False)}"


def _marker_steps(value: str) -> list[tuple[bool, str]]:
    """MSAgent-Bench markers -> ordered (is_tool_result, text) steps in the ReAct protocol."""
    steps, out, loose, pos = [], [], "", 0
    for m in _CALL_OR_RESULT.finditer(value):
        loose += value[pos:m.start()]
        pos = m.end()
        if m.group(1) is not None:  # a call: the text before it is the thought behind it
            if loose.strip():
                out.append(f"Thought: {loose.strip()}")
            out.append(_tool_call(m.group(1)))
        else:  # a result ends the trained output; it becomes the (masked) input of the next turn
            if loose.strip():  # text between a call and its result (none in the real data): kept as is
                out.append(loose.strip())
            if not out:
                raise BadRecord("a tool result (<|startofexec|>) has no tool call before it")
            steps += [(False, "\n".join(out)), (True, f"Response: {_unfence(m.group(2))}")]
            out = []
        loose = ""
    loose += value[pos:]
    if "<|startofthink|>" in loose or "<|startofexec|>" in loose:
        raise BadRecord("an unclosed <|startofthink|> or <|startofexec|> block")
    if loose.strip():
        out.append(f"Final Answer: {loose.strip()}")
    if out:
        steps.append((False, "\n".join(out)))
    return steps


def _react_steps(value: str) -> list[tuple[bool, str]]:
    """Text already in ReAct form: kept verbatim, only cut at each `Observation:` (the tool result)."""
    steps, pos = [], 0
    for m in _OBSERVATION.finditer(value):
        before = value[pos:m.start()].strip()
        if not before:
            raise BadRecord("an 'Observation:' has no 'Action:' before it")
        steps += [(False, before), (True, m.group(0).strip())]
        pos = m.end()
    if value[pos:].strip():
        steps.append((False, value[pos:].strip()))
    return steps


def msagent(record: dict) -> list[Turn]:
    """MSAgent-Bench `conversations` (from system/user/assistant) -> ReAct turns; tool results are never trained.

    An assistant message with `<|startofthink|>`/`<|startofexec|>` markers becomes, in order:

        Thought: <text before a call>            (only when that text is not blank)
        Action: <api_name>
        Action Input: <parameters as compact JSON, ensure_ascii=False; the call's 'url' is dropped>
        -- end of the trained output; next turn's input (masked): --
        Response: <the result, its ```JSON fence removed>
        -- next trained output: --
        Thought: ... / Action: ... (another call) or Final Answer: <the text after the last result>

    Lines are joined with "\\n"; no Thought is invented where the data has none. Each tool round-trip splits
    into Turn(user text or previous Response, Thought/Action) + Turn("Response: ...", what follows), so the
    tool result sits in `input`. A message without markers or ReAct words is a direct reply:
    "Final Answer: <text>". A message already written in ReAct text (ms-swift's ms_agent form: Action /
    Action Input / Observation / Thought / Final Answer, its own system prompt naming `Observation`) is kept
    word for word and only cut at each `Observation: ...` block, which goes to the next turn's input. A tool
    result that ends a message (no text after it) is put before the next user text in that turn's input.
    """
    messages = record["conversations"]
    if not isinstance(messages, list) or not messages:
        raise BadRecord("'conversations' must be a non-empty list of {from, value} messages")
    turns: list[Turn] = []
    system, pending = str(record.get("system") or ""), []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
            raise BadRecord(f"conversations[{i}] must be an object with a string 'value'")
        role, text = msg.get("from"), msg["value"]
        if role == "system":
            system = text
        elif role in ("user", "human"):
            pending.append(text)
        elif role in ("assistant", "gpt"):
            if "<|startofthink|>" in text or "<|startofexec|>" in text:
                steps = _marker_steps(text)
            elif _REACT_WORD.search(text):
                steps = _react_steps(text)
            else:
                steps = [(False, f"Final Answer: {text.strip()}")] if text.strip() else [(False, "")]
            for is_result, step in steps:
                if is_result:
                    pending.append(step)
                else:
                    turns.append(Turn("\n".join(pending), step))
                    pending = []
        else:
            raise BadRecord(f"conversations[{i}]: unknown from '{role}' (expected system, user, assistant)")
    if turns:
        turns[0].system = system
    return turns
