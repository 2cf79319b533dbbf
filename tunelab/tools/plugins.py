"""MOSS-style plugins (`tunelab chat --with-plugins calculate solve search`).

The protocol of MOSS's plugin models: the model writes its commands, e.g.

    <|Inner Thoughts|>: I should compute this<eot>
    <|Commands|>: Calculate("12*7")<eoc>

generation stops at the command stop word (`<eoc>`), tunelab runs each command and appends

    \\n<|Results|>:\\nCalculate("12*7") => 84\\n<eor>\\n

then generation resumes until the answer stop word (the template's end-of-turn marker, `<eom>` for moss_sft).
"""
from __future__ import annotations

import re

from tunelab.tools import TOOLS, ToolError, run_tool

COMMAND_STOP = "<eoc>"
RESULTS_END = "<eor>"
# command name in the text -> tool
COMMANDS = {"Calculate": "calculate", "Solve": "solve", "Search": "search"}
_CALL = re.compile(r"\b(Calculate|Solve|Search)\(\s*(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')\s*\)")
_LABELS = {"calculate": "Calculator", "solve": "Equation solver", "search": "Web search"}
_APIS = {"calculate": 'Calculate(expression)', "solve": 'Solve(equation)', "search": 'Search(query)'}


def plugin_system_prompt(enabled: list[str], bot_name: str = "{bot_name}") -> str:
    """The meta instruction that tells a MOSS-style model which plugins it may call."""
    lines = [f"You are an AI assistant whose name is {bot_name}. You can think before answering "
             f"(<|Inner Thoughts|>: ...<eot>) and call plugins (<|Commands|>: ...<eoc>); their results come "
             f"back after <|Results|>: and end with <eor>. Capabilities and tools that {bot_name} can possess:",
             "- Inner thoughts: enabled."]
    for name in TOOLS:
        state = f"enabled. API: {_APIS[name]}" if name in enabled else "disabled."
        lines.append(f"- {_LABELS[name]}: {state}")
    return "\n".join(lines) + "\n"


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def find_commands(text: str) -> list[tuple[str, str, str]]:
    """(the call as written, tool name, argument) for every plugin call in the text after the last
    `<|Commands|>:` marker (the whole text when there is no marker)."""
    start = text.rfind("<|Commands|>:")
    part = text[start:] if start >= 0 else text
    return [(m.group(0), COMMANDS[m.group(1)], _unquote(m.group(2))) for m in _CALL.finditer(part)]


def results_block(commands: list[tuple[str, str, str]], enabled: list[str]) -> str:
    """The text appended after the command stop word: each call with its result (or its error)."""
    lines = []
    for written, tool, argument in commands:
        if tool not in enabled:
            result = f"error: the {tool} plugin is not enabled (--with-plugins {' '.join(enabled)})"
        else:
            try:
                result = run_tool(tool, argument, enabled)
            except ToolError as exc:
                result = f"error: {exc}"
        lines.append(f"{written} => {result}")
    return "\n<|Results|>:\n" + "\n".join(lines) + f"\n{RESULTS_END}\n"
