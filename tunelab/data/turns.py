"""What every record format is read into: turns (prompt side and trained side), and the two ways a record can
fail to become them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """One function call the assistant makes: the tool's name and its arguments (a JSON object)."""
    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass
class ToolResult:
    """What a called tool returned, as text, and which call it answers."""
    content: str
    name: str = ""
    call_id: str = ""


@dataclass
class Turn:
    """One exchange: the prompt side (system, input, or the results of the previous turn's calls) and the
    trained side (output, then its tool calls).

    `tools` (the JSON-schema functions the dialogue may call, in OpenAI's {"type": "function", "function":
    {...}} shape) is set on the first turn only, like `system`. A `document` turn is pretraining text: its
    output is written as it is, without a template, and every token of it is trained."""
    input: str
    output: str
    system: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    results: list[ToolResult] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    document: bool = False

    @property
    def trained(self) -> bool:
        """Whether the turn has anything to train: answer text or a tool call."""
        return bool(self.output.strip() or self.calls)


class BadRecord(ValueError):
    """A record that does not fit its format; the message says what is missing."""


class Filtered(Exception):
    """A well-formed record that the data itself marks as not for training (a deleted or failed-review OASST
    prompt, a prompt nobody answered): counted and reported, never an error."""
