"""Dataset formats: detect which one a file holds and turn each record into dialogue turns.

Every format becomes the conversation form `[Turn(system, input, output), ...]`; only outputs are trained.
A file holds one format (detected from its first record unless `dataset_format` names it). The formats and
their exact conversions are documented on each converter; msagent and oasst are the non-obvious ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from tunelab.data.loading import Record
from tunelab.data.msagent import is_msagent, msagent
from tunelab.data.turns import BadRecord, Filtered, Turn
from tunelab.errors import DataError


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


def role_messages(messages: Any, role_key: str, text_key: str, roles: dict[str, str]) -> list[Turn]:
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
    return role_messages(messages, "role", "content", {"system": "system", "user": "user", "assistant": "assistant"})


def _sharegpt(record: dict) -> list[Turn]:
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    turns = role_messages(record["conversations"], "from", "value", roles)
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



def _plain_text(record: dict) -> list[Turn]:
    """`{"text": ...}` without guanaco markers: continued pre-training, the whole text is the (trained) output."""
    return [Turn("", _text(record, "text"))]


# --- OpenAssistant export (message trees or message lists) --------------------------------------------
_OASST_ROLES = ("prompter", "assistant")


def _is_oasst_tree(r: Any) -> bool:
    return isinstance(r, dict) and isinstance(r.get("prompt"), dict) and ("message_tree_id" in r or "replies" in r["prompt"])


def _is_oasst_message(r: Any) -> bool:
    return isinstance(r, dict) and "message_id" in r and r.get("role") in _OASST_ROLES and "text" in r


@dataclass
class _Orphan:
    """Stands in for an OASST message whose parent is not in the file."""
    parent_id: str


def _usable(m: Any) -> bool:
    # OA's own exports mark removed messages deleted=true and rejected ones review_result=false
    return isinstance(m, dict) and not m.get("deleted") and m.get("review_result") is not False


def _best_reply(node: dict) -> dict | None:
    """The reply with the best rank (0 best, no rank last); ties go to the first; None when there is none."""
    replies = [r for r in node.get("replies") or []
               if _usable(r) and r.get("role") in _OASST_ROLES and r.get("role") != node.get("role")]
    return min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0), default=None)  # min keeps the first


def _oasst(record: Any) -> list[Turn]:
    """One OASST tree -> ONE conversation along the best replies.

    From the root prompt, repeatedly take the best usable reply (lowest `rank`, rank 0 best; a reply without
    rank ranks last; ties: the first in file order; deleted or review_result=false replies are ignored) until
    a message has none; then pair prompter/assistant texts, verbatim, into turns (a final unanswered prompt
    is dropped). No system text. Filtered (counted, not an error): a tree whose tree_state is set and not
    'ready_for_export' (as OA's own training does), a deleted or failed-review root, a prompt with no
    usable answer. The record is a tree line (`prompt` = root with nested `replies`), a root message with
    nested `replies`, or a tree that `group_oasst_messages` built from a message list.
    """
    if isinstance(record, _Orphan):
        raise BadRecord(f"its parent message {record.parent_id} is not in the file, so it belongs to no tree")
    if _is_oasst_tree(record) and record.get("tree_state", "ready_for_export") != "ready_for_export":
        raise Filtered(f"tree_state is '{record['tree_state']}', not 'ready_for_export'")
    root = record["prompt"] if _is_oasst_tree(record) else record
    if not _usable(root):
        raise Filtered("the prompt is deleted or failed review")
    if root.get("role") != "prompter":
        raise BadRecord(f"the tree starts with a '{root.get('role')}' message, not a prompter one")
    chain, node = [root], root
    while (node := _best_reply(node)) is not None:
        chain.append(node)
    turns = [Turn(_text(p, "text"), _text(a, "text")) for p, a in zip(chain[::2], chain[1::2])]
    if not turns:
        raise Filtered("the prompt has no usable assistant reply")
    return turns


def group_oasst_messages(records: list[Record]) -> list[Record]:
    """A message-list file (one message per line, linked by parent_id; a line may also nest its `replies`)
    -> one record per tree: `{"message_tree_id", "prompt": root with all replies nested}` at the root's line,
    in file order. Other messages are folded into their tree and are not records of their own; a message
    whose parent is missing becomes a bad record at its line. Tree lines pass through unchanged."""
    nodes: dict[Any, dict] = {}
    home: dict[Any, Record] = {}  # message_id -> the record (line) it was read from

    def register(msg: dict, rec: Record) -> None:
        mid = msg.get("message_id")
        if mid is None or mid in nodes:
            return
        nodes[mid], home[mid] = {**msg, "replies": []}, rec
        for child in msg.get("replies") or []:
            if isinstance(child, dict):
                register({"parent_id": mid, **child}, rec)

    for rec in records:
        if _is_oasst_message(rec.value):
            register(rec.value, rec)
    for node in nodes.values():  # link children in file order
        if node.get("parent_id") in nodes:
            nodes[node["parent_id"]]["replies"].append(node)
    out = []
    for rec in records:
        if not _is_oasst_message(rec.value):
            out.append(rec)
            continue
        mid = rec.value["message_id"]
        node = nodes.get(mid)
        if node is None or home[mid] is not rec:  # a repeated message line
            continue
        parent = node.get("parent_id")
        if parent is None:
            out.append(Record({"message_tree_id": node.get("message_tree_id", mid), "prompt": node}, rec.source, rec.line))
        elif parent not in nodes:
            out.append(Record(_Orphan(str(parent)), rec.source, rec.line))
    return out


# --- registry -------------------------------------------------------------------------------------------
def _is_guanaco(r: Any) -> bool:
    return isinstance(r, dict) and isinstance(r.get("text"), str) and bool(_GUANACO.search(r["text"]))


# name -> (is this record of the format?, converter). Order matters: the first match wins.
FORMATS: dict[str, tuple[Callable[[Any], bool], Callable[[Any], list[Turn]]]] = {
    "conversation": (lambda r: isinstance(r, dict) and "conversation" in r, _conversation),
    "openai": (lambda r: (isinstance(r, dict) and "messages" in r)
               or (isinstance(r, list) and bool(r) and isinstance(r[0], dict) and "role" in r[0]), _openai),
    "msagent": (is_msagent, msagent),  # before sharegpt: both use `conversations`
    "sharegpt": (lambda r: isinstance(r, dict) and "conversations" in r, _sharegpt),
    "alpaca": (lambda r: isinstance(r, dict) and "instruction" in r and "output" in r, _alpaca),
    "query_response": (lambda r: isinstance(r, dict) and "query" in r and "response" in r, _query_response),
    "oasst": (lambda r: _is_oasst_tree(r) or _is_oasst_message(r), _oasst),  # before text: messages have 'text'
    "guanaco": (_is_guanaco, _guanaco),
    "text": (lambda r: isinstance(r, dict) and isinstance(r.get("text"), str) and not _is_guanaco(r), _plain_text),
}
# A record that looks like the second format still belongs in a file of the first: a msagent reply without
# tool calls reads as sharegpt; a guanaco record missing its markers is a bad guanaco record, not plain text.
COMPATIBLE = {"msagent": ("sharegpt",), "guanaco": ("text",)}
# Formats whose records are only meaningful together: applied to a file's records before converting.
PREPARE: dict[str, Callable[[list[Record]], list[Record]]] = {"oasst": group_oasst_messages}


def looks_like(value: Any) -> str | None:
    """The first format whose detector accepts the record, or None."""
    return next((name for name, (matches, _) in FORMATS.items() if matches(value)), None)


# The fields that make a record one of the simple formats, and the names other datasets give them: a record
# whose keys are near a format's gets the exact dataset_columns mapping suggested.
_FIELDS = {"query_response": ("query", "response"), "alpaca": ("instruction", "output"),
           "conversation": ("conversation",), "openai": ("messages",), "sharegpt": ("conversations",),
           "text": ("text",)}
_ALIASES = {"query": ("question", "prompt", "instruction", "input", "q"),
            "response": ("answer", "output", "completion", "reply", "target", "a"),
            "instruction": ("question", "prompt", "query", "q"),
            "output": ("answer", "response", "completion", "reply", "target", "a"),
            "conversation": ("dialogue", "dialog", "turns"), "messages": ("chat", "dialogue", "dialog"),
            "conversations": ("dialogue", "dialog", "turns"), "text": ("content", "document", "body")}


def suggest_columns(keys: list[str]) -> tuple[str, dict[str, str]] | None:
    """(format, {record key: format field}) for the format whose fields the record's keys come nearest, or
    None. A key maps to a missing field when it is a usual other name for it or a near spelling of it."""
    import difflib

    best: tuple[int, str, dict[str, str]] | None = None
    for fmt, fields in _FIELDS.items():
        missing = [f for f in fields if f not in keys]
        free = [k for k in keys if k not in fields]
        mapping: dict[str, str] = {}
        for field in missing:
            near = [k for k in free if k.lower() in _ALIASES.get(field, ()) and k not in mapping]
            near = near or difflib.get_close_matches(field, [k for k in free if k not in mapping], n=1, cutoff=0.75)
            if not near:
                break
            mapping[near[0]] = field
        if missing and len(mapping) == len(missing):
            kept = len(fields) - len(missing)  # prefer the format that keeps most of the record's names
            if best is None or kept > best[0]:
                best = (kept, fmt, mapping)
    return (best[1], best[2]) if best else None


def detect_format(value: Any, where: str) -> str:
    """The name of the format a record is in; DataError naming the record when none fits."""
    name = looks_like(value)
    if name is not None:
        return name
    keys = ", ".join(sorted(map(str, value))) if isinstance(value, dict) else type(value).__name__
    near = suggest_columns([str(k) for k in value]) if isinstance(value, dict) else None
    if near is not None:
        fmt, mapping = near
        raise DataError(f"{where}: unrecognised record format (keys: {keys}); it reads as {fmt} with "
                        f"dataset_columns = {mapping!r} in the config")
    raise DataError(f"{where}: unrecognised record format (keys: {keys}); expected one of "
                    f"{', '.join(FORMATS)} (`tunelab train --help`: dataset_format, dataset_columns), or set "
                    f"dataset_format")


def check_one_format(records: list[Record], fmt: str) -> None:
    """DataError at the first record that clearly belongs to another format than the file's."""
    for rec in records:
        other = looks_like(rec.value)
        if other is not None and other != fmt and other not in COMPATIBLE.get(fmt, ()):
            raise DataError(f"{rec.where}: this record looks like {other} but the file's first record is {fmt}; "
                            f"split the file or set dataset_format")


def to_turns(value: Any, fmt: str) -> list[Turn]:
    """Convert one record of a known format; raises BadRecord with the reason (or Filtered)."""
    try:
        return FORMATS[fmt][1](value)
    except (KeyError, TypeError, AttributeError) as exc:
        raise BadRecord(f"does not fit the {fmt} format ({type(exc).__name__}: {exc})") from None

