"""The package's shape, read from its own imports (an ast walk, lazy imports inside functions included): the
layers follow the data's path and each imports only its own or lower ones, no module reaches itself through
its imports, no file is over 450 lines, and no fault-injection hook sits on a product path (the crash tests
inject theirs from outside: tests/fault_injection.py)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tunelab"
# lowest first; a module belongs to the first layer with a prefix it starts with
LAYERS = [
    ("base", ["tunelab", "tunelab.errors", "tunelab.fsutil"]),
    ("config", ["tunelab.config"]),
    ("data", ["tunelab.data"]),
    ("model", ["tunelab.model"]),
    ("fast", ["tunelab.fast"]),
    ("train", ["tunelab.train"]),
    ("export", ["tunelab.export"]),
    ("chat", ["tunelab.chat", "tunelab.tools"]),
    ("serve", ["tunelab.serve"]),
    ("cli", ["tunelab.cli", "tunelab.__main__"]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The tunelab modules `name` imports (a package's own submodules imported by its __init__ left out: that
    is how a package is assembled, not an arrow between rooms)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                       for a in node.names]
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name and not target.startswith(name + "."):
                out.add(target)
    return out


def _layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def test_every_import_goes_down_or_stays_in_its_layer():
    modules = _modules()
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
              for m, p in modules.items() for t in sorted(_imports(m, p, modules)) if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_module_reaches_itself_through_its_imports():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    circles = []

    def visit(node, trail):
        for nxt in graph[node]:
            if nxt == trail[0]:
                circles.append(" -> ".join(trail + [nxt]))
            elif nxt not in trail and nxt > trail[0]:  # each circle once, from its smallest module
                visit(nxt, trail + [nxt])
    for start in sorted(graph):
        visit(start, [start])
    assert not circles, "\n".join(circles)


def test_no_file_is_over_450_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, long


def test_no_fault_hooks_on_product_paths():
    hooks = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\bfault\(|TUNELAB_FAULT|kill_now", line)]
    assert not hooks, hooks


def test_the_config_names_the_formats_data_reads():
    from tunelab.config.schema import DATASET_FORMATS
    from tunelab.data.formats import FORMATS

    assert tuple(FORMATS) == DATASET_FORMATS
