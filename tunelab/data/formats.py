"""Dataset formats: detect which one a file holds and turn each record into dialogue turns.

Every format becomes the conversation form `[Turn(system, input, output), ...]`; only outputs are trained.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from tunelab.errors import DataError


@dataclass
class Turn:
    """One exchange: the prompt side (system, input) and the trained side (output)."""
    input: str
    output: str
    system: str = ""


class BadRecord(ValueError):
    """A record that does not fit its format; the message says what is missing."""


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise BadRecord(f"missing '{key}'")
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _conversation(record: dict) -> list[Turn]:
    turns = record["conversation"]
    if not isinstance(turns, list) or not turns:
        raise BadRecord("'conversation' must be a non-empty list of {system?, input, output} objects")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(f"conversation[{i}] must be an object with 'input' and 'output'")
        try:
            out.append(Turn(_text(turn, "input", required=False), _text(turn, "output"),
                            _text(turn, "system", required=False)))
        except BadRecord as exc:
            raise BadRecord(f"conversation[{i}]: {exc}") from None
    return out


def _alpaca(record: dict) -> list[Turn]:
    instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
    output = _text(record, "output")
    if output.strip() == "<nooutput>":
        output = ""
    return [Turn(f"{instruction}\n{extra}" if extra.strip() else instruction, output)]


def _role_messages(messages: Any, role_key: str, text_key: str, roles: dict[str, str]) -> list[Turn]:
    """Pair (system?) user -> assistant messages into turns; consecutive user texts are joined."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord("the message list is empty or not a list")
    turns: list[Turn] = []
    system, pending = "", []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or role_key not in msg:
            raise BadRecord(f"message {i} has no '{role_key}'")
        role = roles.get(str(msg[role_key]))
        text = msg.get(text_key)
        if role is None:
            raise BadRecord(f"message {i}: unknown {role_key} '{msg[role_key]}' (expected {', '.join(roles)})")
        if not isinstance(text, str):
            raise BadRecord(f"message {i}: '{text_key}' must be a string")
        if role == "system":
            system = text
        elif role == "user":
            pending.append(text)
        else:
            turns.append(Turn("\n".join(pending), text, system if not turns else ""))
            pending = []
    return turns


def _openai(record: Any) -> list[Turn]:
    messages = record["messages"] if isinstance(record, dict) else record
    return _role_messages(messages, "role", "content", {"system": "system", "user": "user", "assistant": "assistant"})


def _sharegpt(record: dict) -> list[Turn]:
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    turns = _role_messages(record["conversations"], "from", "value", roles)
    if record.get("system") and turns and not turns[0].system:
        turns[0].system = str(record["system"])
    return turns


_GUANACO = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


def _guanaco(record: dict) -> list[Turn]:
    parts = _GUANACO.split(_text(record, "text"))
    turns, pending = [], None
    for speaker, text in zip(parts[1::2], parts[2::2]):
        if speaker.lower() == "human":
            pending = text.strip()
        elif pending is not None:
            turns.append(Turn(pending, text.strip()))
            pending = None
    if not turns:
        raise BadRecord("no '### Human: ... ### Assistant: ...' exchange in 'text'")
    return turns


def _query_response(record: dict) -> list[Turn]:
    turns = []
    for i, pair in enumerate(record.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise BadRecord(f"history[{i}] must be a [query, response] pair")
        turns.append(Turn(str(pair[0]), str(pair[1])))
    turns.append(Turn(_text(record, "query"), _text(record, "response")))
    turns[0].system = _text(record, "system", required=False)
    return turns


# name -> (is this record of the format?, converter). Order matters: the first match wins.
FORMATS: dict[str, tuple[Callable[[Any], bool], Callable[[Any], list[Turn]]]] = {
    "conversation": (lambda r: isinstance(r, dict) and "conversation" in r, _conversation),
    "openai": (lambda r: (isinstance(r, dict) and "messages" in r)
               or (isinstance(r, list) and bool(r) and isinstance(r[0], dict) and "role" in r[0]), _openai),
    "sharegpt": (lambda r: isinstance(r, dict) and "conversations" in r, _sharegpt),
    "alpaca": (lambda r: isinstance(r, dict) and "instruction" in r and "output" in r, _alpaca),
    "query_response": (lambda r: isinstance(r, dict) and "query" in r and "response" in r, _query_response),
    "guanaco": (lambda r: isinstance(r, dict) and isinstance(r.get("text"), str) and bool(_GUANACO.search(r["text"])),
                _guanaco),
}


def detect_format(value: Any, where: str) -> str:
    """The name of the format a record is in; DataError naming the record when none fits."""
    for name, (matches, _) in FORMATS.items():
        if matches(value):
            return name
    keys = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
    raise DataError(f"{where}: unrecognised record format (keys: {keys}); expected one of "
                    f"{', '.join(FORMATS)} (SPEC section 4), or set dataset_format")


def to_turns(value: Any, fmt: str) -> list[Turn]:
    """Convert one record of a known format; raises BadRecord with the reason."""
    try:
        return FORMATS[fmt][1](value)
    except (KeyError, TypeError) as exc:
        raise BadRecord(f"does not fit the {fmt} format ({type(exc).__name__}: {exc})") from None
