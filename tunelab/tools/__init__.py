"""Tools a chat model can call: a safe calculator, an equation solver (sympy) and web search (Serper).

Each tool takes one string and returns a string, or raises ToolError with a message meant to be shown to
the model (and the user) in place of a result. `run_tool` is the single entry point used by both the
MOSS-style plugins (`--with-plugins`) and the ReAct agent (`--lagent`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


class ToolError(Exception):
    """A tool could not produce a result; the message says why, in words the model and user can read."""


@dataclass(frozen=True)
class Tool:
    name: str                 # what the model writes after `Action:` (case-insensitive, aliases accepted)
    description: str          # one line for the agent's system prompt
    parameter: str            # the JSON key of its single input in `Action Input`
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def run(self, text: str) -> str:
        return _IMPLEMENTATIONS[self.name](text)


def _calculate(text: str) -> str:
    from tunelab.tools.calculator import calculate

    return calculate(text)


def _solve(text: str) -> str:
    from tunelab.tools.solver import solve

    return solve(text)


def _search(text: str) -> str:
    from tunelab.tools.search import search

    return search(text)


_IMPLEMENTATIONS: dict[str, Callable[[str], str]] = {"calculate": _calculate, "solve": _solve, "search": _search}

TOOLS: dict[str, Tool] = {
    "calculate": Tool("calculate", "evaluates an arithmetic expression such as (3 + 4) * 2 ** 5 or sqrt(2) / 3",
                      "expression", ("calculator", "calc", "Calculate")),
    "solve": Tool("solve", "solves equations for their unknowns, e.g. 2*x + 3 = 7 or x + y = 3; x - y = 1",
                  "equation", ("solver", "equation_solver", "EquationSolver", "Solve")),
    "search": Tool("search", "searches the web and returns the top results (title, snippet, link)", "query",
                   ("web_search", "google_search", "GoogleSearch", "Search", "serper")),
}


def find_tool(name: str, enabled: list[str] | None = None) -> Tool | None:
    """The enabled tool called `name` (its name or an alias, any case), or None."""
    key = name.strip().strip("`'\"").lower()
    for tool in TOOLS.values():
        if enabled is not None and tool.name not in enabled:
            continue
        if key == tool.name or key in (a.lower() for a in tool.aliases):
            return tool
    return None


def check_tool_names(names: list[str]) -> list[str]:
    """Canonical names for --with-plugins values; ValueError naming a bad one."""
    out = []
    for name in names:
        tool = find_tool(name)
        if tool is None:
            raise ValueError(f"unknown tool '{name}'; valid: {', '.join(TOOLS)}")
        if tool.name not in out:
            out.append(tool.name)
    return out


def run_tool(name: str, text: str, enabled: list[str] | None = None) -> str:
    """Run a tool by name; ToolError (never another exception) when it cannot answer."""
    tool = find_tool(name, enabled)
    if tool is None:
        valid = ", ".join(enabled if enabled is not None else TOOLS)
        raise ToolError(f"there is no tool '{name}'; use one of: {valid}")
    try:
        return tool.run(text)
    except ToolError:
        raise
    except Exception as exc:  # noqa: BLE001 - a tool bug must reach the model as an error, not end the chat
        raise ToolError(f"{tool.name} failed: {type(exc).__name__}: {exc}") from None
