"""`tunelab chat --lagent`: a ReAct agent loop in the text protocol that tunelab's msagent format trains.

Training (tunelab/data/formats.py, `_msagent`) turns an MSAgent-Bench tool round trip into two turns of the
prompt template:

    Turn(input=<user question>,          output="Thought: ...\\nAction: <tool>\\nAction Input: <JSON>")
    Turn(input="Response: <tool result>", output="Thought: ...\\nFinal Answer: <answer>")   (or another call)

The agent builds exactly these turns and encodes them with the same PromptFormat, so at chat time the model
sees, token for token, the layout it was trained on: it writes a step, generation stops at the template's
end-of-turn marker, the agent runs the tool and opens the next turn with "Response: <result>" as its input.
Tool errors become the Response ("error: ..."), so the model can recover; a step limit ends runaway loops.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Callable

import torch

from tunelab.data.encode import PromptFormat
from tunelab.data.formats import Turn
from tunelab.model.generate import Sampling, generate
from tunelab.tools import TOOLS, ToolError, find_tool, run_tool

MAX_STEPS = 6
# Stop a step where a tool result would begin: a model that has not learnt the end-of-turn marker yet must
# not invent the tool's answer.
RESULT_MARKERS = ("\nResponse:", "\nObservation:")

_FINAL = re.compile(r"^\s*Final\s+Answer\s*[:：]", re.M | re.I)
_ACTION = re.compile(r"^\s*Action\s*[:：][ \t]*(.*)$", re.M)
_ACTION_INPUT = re.compile(r"^\s*Action\s+Input\s*[:：][ \t]*", re.M)
_NEXT_FIELD = re.compile(r"^\s*(?:Response|Observation|Thought|Final\s+Answer|Action)\s*[:：]", re.M | re.I)


def agent_system_prompt(tools: list[str]) -> str:
    """The system text that tells a model which tools it has and the ReAct reply format. Train agent data
    with this text (or set SYSTEM to it) and `chat --lagent` with the same tools shows the model the same."""
    lines = ["You can use tools to answer the user. The tools are:"]
    for i, name in enumerate(tools, 1):
        tool = TOOLS[name]
        lines.append(f'{i}. {tool.name}: {tool.description}. Input: {{"{tool.parameter}": "..."}}')
    lines += [
        "To use a tool, reply in this format:",
        "Thought: what the current step needs and whether a tool helps",
        f"Action: the tool name, one of [{', '.join(tools)}]",
        "Action Input: the tool input as JSON",
        "The tool's result comes back as:",
        "Response: the result",
        "When you know the answer, or need no tool, reply:",
        "Thought: why this is the answer",
        "Final Answer: the answer",
        "Begin!",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Step:
    """What the model wrote in one turn, parsed."""
    text: str                   # the model's text, cut after Action Input (what stays in the transcript)
    action: str | None = None
    action_input: str = ""
    final: str | None = None


def parse_step(text: str) -> Step:
    """Read a ReAct reply: a tool call (Action + Action Input) or a Final Answer, whichever comes first.
    A reply with neither is taken as the final answer as a whole."""
    action, final = _ACTION.search(text), _FINAL.search(text)
    if action and (not final or action.start() < final.start()):
        rest = text[action.end():]
        given = _ACTION_INPUT.search(rest)
        value, end = "", action.end()
        if given and not rest[:given.start()].strip():
            after = rest[given.end():]
            stop = _NEXT_FIELD.search(after)
            value = (after[:stop.start()] if stop else after).strip()
            end = action.end() + given.end() + (stop.start() if stop else len(after))
        return Step(text[:end].rstrip(), action.group(1).strip(), value)
    if final:
        return Step(text.rstrip(), final=text[final.end():].strip())
    return Step(text.rstrip(), final=text.strip())


def tool_argument(raw: str, parameter: str) -> str:
    """The single string a tool takes, from an Action Input: JSON object (its `parameter` key, or its only
    value), a Python-literal dict (MSAgent data writes those), a JSON string, or plain text."""
    raw = raw.strip()
    value = None
    for reader in (json.loads, ast.literal_eval):  # literal_eval reads literals only; it never runs code
        try:
            value = reader(raw)
            break
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    if isinstance(value, dict):
        if parameter in value:
            return str(value[parameter])
        strings = [v for v in value.values() if isinstance(v, (str, int, float))]
        if len(strings) == 1:
            return str(strings[0])
        raise ToolError(f"Action Input must be like {{\"{parameter}\": \"...\"}}, got {raw}")
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    return raw


class ReActAgent:
    """Runs the Thought/Action/Response loop for one user message at a time, keeping the transcript."""

    def __init__(self, model, tokenizer, fmt: PromptFormat, tools: list[str], sampling: Sampling,
                 stop_words: list[str], max_steps: int = MAX_STEPS, show: Callable[[str], None] | None = None,
                 stream: bool = True):
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt
        self.tools, self.sampling, self.max_steps = tools, sampling, max_steps
        self.stop_words = list(dict.fromkeys(list(stop_words) + list(RESULT_MARKERS)))
        self.show = show or (lambda text: None)
        self.stream = stream

    def call_tool(self, step: Step) -> str:
        """The Response text for a step's tool call; every failure becomes 'error: ...'."""
        tool = find_tool(step.action or "", self.tools)
        try:
            if tool is None:
                raise ToolError(f"there is no tool '{step.action}'; use one of: {', '.join(self.tools)}")
            return run_tool(tool.name, tool_argument(step.action_input, tool.parameter), self.tools)
        except ToolError as exc:
            return f"error: {exc}"

    def run(self, question: str, history: list[Turn]) -> tuple[str, list[Turn]]:
        """Answer `question` after `history`; returns the final answer and the new transcript."""
        turns = list(history) + [Turn(question, "")]
        for _ in range(self.max_steps):
            ids, _ = self.fmt.encode(turns, open_last=True)
            text = generate(self.model, self.tokenizer, ids, self.stop_words, self.sampling,
                            self.show if self.stream else None)
            step = parse_step(text)
            if not self.stream:
                self.show(step.text)
            turns[-1] = Turn(turns[-1].input, step.text, turns[-1].system)
            if step.final is not None:
                self.show("\n")
                return step.final, turns
            result = self.call_tool(step)
            self.show(f"\nResponse: {result}\n")
            turns.append(Turn(f"Response: {result}", ""))
        note = f"(no final answer after {self.max_steps} steps)"
        self.show(note + "\n")
        turns[-1] = Turn(turns[-1].input, "Final Answer: " + note, turns[-1].system)
        return note, turns


def run_agent_turn(agent: ReActAgent, question: str, history: list[Turn], seed: int) -> tuple[str, list[Turn]]:
    """One user message through the agent with a fixed sampling seed (so replies are reproducible)."""
    torch.manual_seed(seed)
    return agent.run(question, history)
