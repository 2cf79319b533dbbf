"""A safe arithmetic evaluator: the expression is parsed with `ast` and only whitelisted node types are
walked by hand; nothing is ever passed to eval/exec. Sizes are bounded before each operation runs (no
10**10**10), so every expression finishes quickly and in little memory."""
from __future__ import annotations

import ast
import math
import operator
import time

from tunelab.tools import ToolError

MAX_CHARS = 500          # longer input is refused before parsing
MAX_NODES = 200          # operations in one expression
MAX_BITS = 10_000        # largest integer result (about 3000 decimal digits)
MAX_FACTORIAL = 1000
TIME_LIMIT_S = 1.0

# Names the model may use: functions of floats and constants. Nothing else resolves.
FUNCTIONS = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "ln": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh, "degrees": math.degrees, "radians": math.radians,
    "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil, "min": min, "max": max,
    "factorial": math.factorial, "gcd": math.gcd,
}
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Call, ast.Load,
                 ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.UAdd, ast.USub)
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
# How people (and models) write arithmetic that Python spells differently.
_SPELLINGS = {"×": "*", "÷": "/", "^": "**", "（": "(", "）": ")", "−": "-", "，": ","}


def normalise(text: str) -> str:
    """Common notations mapped to Python's: 2^3 and 2×3 and a trailing '=' are accepted."""
    text = text.strip().strip("`").strip()
    for src, dst in _SPELLINGS.items():
        text = text.replace(src, dst)
    return text.rstrip("=").strip()


def parse_checked(text: str, allowed: tuple = ALLOWED_NODES, names: set[str] | None = None,
                  functions: set[str] | None = None) -> ast.Expression:
    """Parse an expression and refuse any node type, name or call outside the whitelist (ToolError)."""
    if len(text) > MAX_CHARS:
        raise ToolError(f"the expression is too long ({len(text)} characters; at most {MAX_CHARS})")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"'{text}' is not an arithmetic expression") from None
    except (RecursionError, MemoryError, ValueError):
        raise ToolError("the expression is nested too deeply") from None
    names = set(CONSTANTS) if names is None else names
    functions = set(FUNCTIONS) if functions is None else functions
    count = 0
    for node in ast.walk(tree):
        count += 1
        if count > MAX_NODES * 3:
            raise ToolError(f"the expression has too many operations (at most {MAX_NODES})")
        if not isinstance(node, allowed):
            raise ToolError(f"'{type(node).__name__}' is not allowed: only numbers, + - * / // % **, "
                            f"parentheses and the functions {', '.join(sorted(functions))}")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool)
                                               or not isinstance(node.value, (int, float))):
            raise ToolError(f"{node.value!r} is not a number")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in functions:
                raise ToolError("only these functions can be called: " + ", ".join(sorted(functions)))
            if node.keywords:
                raise ToolError("functions take positional arguments only")
        elif isinstance(node, ast.Name) and node.id not in names and node.id not in functions:
            raise ToolError(f"unknown name '{node.id}'; known: {', '.join(sorted(names))}")
    return tree


def _bits(value) -> int:
    return abs(value).bit_length() if isinstance(value, int) else 0


def _power(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
        if _bits(base) > 1 and _bits(base) * exponent > MAX_BITS:
            raise ToolError(f"the result of {base} ** {exponent} would be too large (more than {MAX_BITS} bits)")
        return base ** exponent
    result = math.pow(base, exponent)  # floats: OverflowError instead of endless work
    return result


class _Evaluator:
    def __init__(self):
        self.deadline = time.monotonic() + TIME_LIMIT_S
        self.steps = 0

    def eval(self, node):
        self.steps += 1
        if self.steps > MAX_NODES or time.monotonic() > self.deadline:
            raise ToolError("the expression takes too long to evaluate")
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            raise ToolError(f"'{node.id}' is a function; call it like {node.id}(2)")
        if isinstance(node, ast.UnaryOp):
            value = self.eval(node.operand)
            return -value if isinstance(node.op, ast.USub) else +value
        if isinstance(node, ast.BinOp):
            left, right = self.eval(node.left), self.eval(node.right)
            if isinstance(node.op, ast.Pow):
                return _power(left, right)
            if isinstance(node.op, ast.Mult) and _bits(left) + _bits(right) > MAX_BITS:
                raise ToolError(f"the product would be too large (more than {MAX_BITS} bits)")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Call):
            args = [self.eval(a) for a in node.args]
            name = node.func.id
            if name == "factorial" and (len(args) != 1 or not isinstance(args[0], int) or args[0] > MAX_FACTORIAL):
                raise ToolError(f"factorial takes one whole number of at most {MAX_FACTORIAL}")
            return FUNCTIONS[name](*args)
        raise ToolError(f"'{type(node).__name__}' is not allowed")  # parse_checked keeps this unreachable


def format_number(value) -> str:
    """Integers exactly; floats to 12 significant digits, without a trailing .0 for whole values."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ToolError("the result is not a finite number")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".12g")
    return str(value)


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text; ToolError saying why when it cannot be computed."""
    text = normalise(expression)
    if not text:
        raise ToolError("the expression is empty")
    tree = parse_checked(text)
    try:
        return format_number(_Evaluator().eval(tree))
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large") from None
    except (ValueError, TypeError) as exc:  # math domain errors, wrong argument counts
        raise ToolError(f"cannot compute '{text}': {exc}") from None
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None
