"""The tools behind --with-plugins and --lagent: the safe calculator, the sympy solver, Serper search against a
real HTTP server on 127.0.0.1, and the MOSS-style command parsing."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunelab.tools import ToolError, check_tool_names, find_tool, run_tool
from tunelab.tools.calculator import calculate
from tunelab.tools.plugins import find_commands, plugin_system_prompt, results_block
from tunelab.tools.search import search
from tunelab.tools.solver import solve

SERPER_ANSWER = {
    "searchParameters": {"q": "tunelab", "type": "search"},
    "answerBox": {"title": "tunelab", "answer": "a fine-tuning toolkit"},
    "organic": [
        {"title": "tunelab docs", "link": "https://example.org/tunelab", "snippet": "Fine-tune LLMs from a config.",
         "position": 1},
        {"title": "Second hit", "link": "https://example.org/2", "snippet": "More about tunelab.", "position": 2},
    ],
}


# --- calculator ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr,expected", [
    ("12*7", "84"), ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("7 / 2", "3.5"), ("7 // 2", "3"), ("7 % 4", "3"),
    ("2 ** 10", "1024"), ("2^10", "1024"), ("-3 + +5", "2"), ("10 / 4 * 2", "5"), ("1/3", "0.333333333333"),
    ("sqrt(16) + abs(-2)", "6"), ("round(pi, 4)", "3.1416"), ("factorial(10)", "3628800"), ("3×4÷6", "2"),
    ("2 ** 0.5", "1.41421356237"), ("2 ** -1", "0.5"), ("12*7=", "84"), ("99999999999 * 99999999999",
                                                                          "9999999999800000000001"),
])
def test_calculator_computes_ordinary_arithmetic(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize("expr,reason", [
    ("__import__('os').system('x')", "only these functions"),
    ("(1).real", "'Attribute' is not allowed"),
    ("(12).__class__", "'Attribute' is not allowed"),
    ("open('/etc/passwd')", "only these functions"),
    ("[1, 2][0]", "is not allowed"),
    ("'a' * 3", "is not a number"),
    ("lambda: 1", "'Lambda' is not allowed"),
    ("x + 1", "unknown name 'x'"),
    ("1 if 1 else 2", "'IfExp' is not allowed"),
    ("1 << 100000", "'LShift' is not allowed"),
])
def test_calculator_refuses_code(expr, reason):
    with pytest.raises(ToolError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        calculate(expr)


@pytest.mark.parametrize("expr", ["10**10**10", "9**9**9", "2**100000", "factorial(100000)",
                                  "(10**3000)*(10**3000)", "10.0**400"])
def test_calculator_bounds_huge_results_in_time_and_size(expr):
    start = time.monotonic()
    with pytest.raises(ToolError, match="too large|at most"):
        calculate(expr)
    assert time.monotonic() - start < 0.5


def test_calculator_bounds_input_length_and_nesting():
    with pytest.raises(ToolError, match="too long"):
        calculate("1+" * 400 + "1")
    with pytest.raises(ToolError, match="too long|nested"):
        calculate("(" * 300 + "1" + ")" * 300)
    with pytest.raises(ToolError, match="division by zero"):
        calculate("1/0")
    with pytest.raises(ToolError, match="not an arithmetic expression"):
        calculate("2 +")


# --- solver --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("2*x + 3 = 7", "x = 2"),
    ("x^2 - 4 = 0", "x = -2 or x = 2"),
    ("x + y = 3; x - y = 1", "x = 2, y = 1"),
    ("x + y = 3, x - y = 1", "x = 2, y = 1"),
    ("x**2 = 2", "x = -sqrt(2) ≈ -1.41421356237 or x = sqrt(2) ≈ 1.41421356237"),
    ("x + 1 = x", "no solution"),
    ("t/4 = 2.5", "t = 10"),
])
def test_solver_solves(text, expected):
    assert solve(text) == expected


@pytest.mark.parametrize("text,reason", [
    ("__import__('os').system('ls') = 0", "only these functions"),
    ("x.real = 1", "'Attribute' is not allowed"),
    ("x**100000 = 1", "exponents are limited"),
    ("3 = 3 = 3", "not an equation"),
    ("1 + 1 = 2", "no unknown"),
])
def test_solver_refuses(text, reason):
    with pytest.raises(ToolError, match=reason):
        solve(text)


# --- search against a local Serper-shaped server -----------------------------------------------------------
class _Serper(BaseHTTPRequestHandler):
    mode = "ok"
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"body": body, "key": self.headers.get("X-API-KEY")})
        if self.mode == "slow":
            time.sleep(2)
        if self.mode == "error":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal error")
            return
        payload = json.dumps(SERPER_ANSWER if self.mode != "empty" else {"organic": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def serper(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Serper)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Serper.mode, _Serper.seen = "ok", []
    monkeypatch.setenv("TUNELAB_SERPER_URL", f"http://127.0.0.1:{server.server_port}/search")
    monkeypatch.setenv("SERPER_API_KEY", "test-key")
    yield _Serper
    server.shutdown()
    server.server_close()


def test_search_formats_serper_results(serper):
    text = search("tunelab")
    assert serper.seen == [{"body": {"q": "tunelab"}, "key": "test-key"}]
    assert text.splitlines() == [
        "1. tunelab: a fine-tuning toolkit",
        "2. tunelab docs Fine-tune LLMs from a config. (https://example.org/tunelab)",
        "3. Second hit More about tunelab. (https://example.org/2)",
    ]
    serper.mode = "empty"
    assert search("nothing") == "no results"


def test_search_errors_are_readable(serper, monkeypatch):
    serper.mode = "error"
    with pytest.raises(ToolError, match=r"^search: the search service answered HTTP 500"):
        search("tunelab")
    serper.mode = "slow"
    monkeypatch.setenv("TUNELAB_SEARCH_TIMEOUT", "0.3")
    start = time.monotonic()
    with pytest.raises(ToolError, match=r"^search: no answer from http://127.0.0.1:\d+/search within 0.3 s"):
        search("tunelab")
    assert time.monotonic() - start < 1.5
    monkeypatch.delenv("SERPER_API_KEY")
    with pytest.raises(ToolError, match="SERPER_API_KEY is not set"):
        search("tunelab")


def test_search_without_network_is_readable(monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", "k")
    monkeypatch.setenv("TUNELAB_SERPER_URL", "http://127.0.0.1:9/search")  # discard port: nothing listens
    with pytest.raises(ToolError, match=r"^search: cannot reach http://127.0.0.1:9/search .*network"):
        search("tunelab")


# --- registry and MOSS-style plugins -------------------------------------------------------------------------
def test_tool_names_and_aliases():
    assert find_tool("Calculator").name == "calculate" and find_tool("GoogleSearch").name == "search"
    assert find_tool("calculate", ["search"]) is None
    assert check_tool_names(["calculate", "Solve", "search", "calc"]) == ["calculate", "solve", "search"]
    with pytest.raises(ValueError, match="unknown tool 'python'"):
        check_tool_names(["python"])
    with pytest.raises(ToolError, match="there is no tool 'python'"):
        run_tool("python", "1")
    assert run_tool("solve", "x - 1 = 0") == "x = 1"


def test_plugin_commands_and_results(serper):
    said = '<|Inner Thoughts|>: compute it<eot>\n<|Commands|>: Calculate("12*7"), Solve("x^2=9"), Search(\'tunelab\')'
    commands = find_commands(said)
    assert [c[1:] for c in commands] == [("calculate", "12*7"), ("solve", "x^2=9"), ("search", "tunelab")]
    block = results_block(commands, ["calculate", "solve"])
    assert block.startswith("\n<|Results|>:\nCalculate(\"12*7\") => 84\nSolve(\"x^2=9\") => x = -3 or x = 3\n")
    assert "Search('tunelab') => error: the search plugin is not enabled" in block
    assert block.endswith("\n<eor>\n")
    block = results_block(find_commands('Calculate("__import__(\'os\')")'), ["calculate"])
    assert "=> error: only these functions can be called" in block
    prompt = plugin_system_prompt(["calculate"], "Tuney")
    assert "Tuney" in prompt and "Calculator: enabled. API: Calculate(expression)" in prompt
    assert "Web search: disabled." in prompt
