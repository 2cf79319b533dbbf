"""Equation solver built on sympy. The text is parsed by the calculator's whitelisting `ast` parser and turned
into sympy objects node by node (sympify/parse_expr would eval the text, so they are never used); solving
runs under a time limit."""
from __future__ import annotations

import ast
import contextlib
import re
import signal
import threading

from tunelab.tools import ToolError
from tunelab.tools.calculator import ALLOWED_NODES, MAX_CHARS, normalise, parse_checked

TIME_LIMIT_S = 5.0
MAX_EXPONENT = 100
MAX_EQUATIONS = 6
_SYMBOL = re.compile(r"^[A-Za-z]\w{0,15}$")


def _sympy():
    try:
        import sympy
    except ImportError:
        raise ToolError("solve needs sympy: pip install sympy") from None
    return sympy


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ToolError when the block runs longer than `seconds` (SIGALRM; only in the main thread of a
    Unix process, elsewhere the block runs unbounded)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except TimeoutError:
        raise ToolError(f"solving took longer than {seconds:g} s; simplify the equation") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _functions(sp) -> dict:
    return {"sqrt": sp.sqrt, "exp": sp.exp, "log": sp.log, "ln": sp.log, "sin": sp.sin, "cos": sp.cos,
            "tan": sp.tan, "asin": sp.asin, "acos": sp.acos, "atan": sp.atan, "abs": sp.Abs}


def _to_sympy(node, sp, symbols: dict):
    """An already-whitelisted ast node -> a sympy expression."""
    if isinstance(node, ast.Expression):
        return _to_sympy(node.body, sp, symbols)
    if isinstance(node, ast.Constant):
        return sp.Integer(node.value) if isinstance(node.value, int) else sp.Rational(repr(node.value))
    if isinstance(node, ast.Name):
        if node.id in ("pi", "e", "I"):
            return {"pi": sp.pi, "e": sp.E, "I": sp.I}[node.id]
        return symbols.setdefault(node.id, sp.Symbol(node.id))
    if isinstance(node, ast.UnaryOp):
        value = _to_sympy(node.operand, sp, symbols)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _to_sympy(node.left, sp, symbols), _to_sympy(node.right, sp, symbols)
        if isinstance(node.op, ast.Pow):
            if right.is_number and abs(right) > MAX_EXPONENT:
                raise ToolError(f"exponents are limited to {MAX_EXPONENT} in equations")
            return left ** right
        if isinstance(node.op, (ast.Div, ast.FloorDiv)):
            return left / right
        if isinstance(node.op, ast.Mod):
            return sp.Mod(left, right)
        return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
    if isinstance(node, ast.Call):
        args = [_to_sympy(a, sp, symbols) for a in node.args]
        if len(args) != 1:
            raise ToolError(f"{node.func.id} takes one argument")
        return _functions(sp)[node.func.id](args[0])
    raise ToolError(f"'{type(node).__name__}' is not allowed")


def _split_equations(text: str) -> list[str]:
    parts = [p.strip() for p in re.split(r"[;\n]", text) if p.strip()]
    if len(parts) == 1 and "," in text and all("=" in p for p in text.split(",")):
        parts = [p.strip() for p in text.split(",")]
    if len(parts) > MAX_EQUATIONS:
        raise ToolError(f"at most {MAX_EQUATIONS} equations at once")
    return parts


def _names_in(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def parse_equations(text: str):
    """(list of sympy equations, list of unknowns) from 'lhs = rhs' parts separated by ';' (or ',');
    a part without '=' means 'expression = 0'."""
    sp = _sympy()
    functions = set(_functions(sp))
    symbols: dict = {}
    equations = []
    for part in _split_equations(normalise(text)):
        sides = [s for s in re.split(r"==?", part)]
        if len(sides) > 2 or not all(s.strip() for s in sides):
            raise ToolError(f"'{part}' is not an equation of the form left = right")
        exprs = []
        for side in sides:
            exprs.append(_to_sympy(_parse_side(side.strip(), functions), sp, symbols))
        equations.append(sp.Eq(exprs[0], exprs[1]) if len(exprs) == 2 else sp.Eq(exprs[0], 0))
    unknowns = [symbols[k] for k in sorted(symbols)]
    if not unknowns:
        raise ToolError("the equation has no unknown to solve for (use letters such as x, y)")
    return equations, unknowns


def _parse_side(text: str, functions: set[str]) -> ast.Expression:
    """Whitelisted parse where any short identifier that is not a function counts as an unknown."""
    names: set[str] = set()
    if len(text) <= MAX_CHARS:
        try:
            names = {n for n in _names_in(ast.parse(text, mode="eval")) if _SYMBOL.match(n) and n not in functions}
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            pass  # parse_checked below reports it
    return parse_checked(text, ALLOWED_NODES, names=names | {"pi", "e", "I"}, functions=functions)


def _show(value, sp) -> str:
    exact = str(value)
    if value.is_number and not value.is_Integer:
        approx = value.evalf(12)
        if str(approx) != exact:
            return f"{exact} ≈ {approx}"
    return exact


def solve(text: str) -> str:
    """Solutions of one equation or a system, e.g. 'x^2 - 4 = 0' -> 'x = -2 or x = 2'."""
    sp = _sympy()
    equations, unknowns = parse_equations(text)
    with time_limit(TIME_LIMIT_S):
        if any(eq is sp.false for eq in equations):
            return "no solution"
        equations = [eq for eq in equations if eq is not sp.true]
        if not equations:
            return "every value is a solution"
        solutions = sp.solve(equations, unknowns, dict=True)
        if not solutions:
            return "no solution"
        rendered = [", ".join(f"{k} = {_show(v, sp)}" for k, v in sorted(s.items(), key=lambda kv: str(kv[0])))
                    for s in solutions]
    return " or ".join(rendered)
