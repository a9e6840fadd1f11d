"""No function in ``optima/`` takes more than six parameters, except public entry points whose
options beyond six are keyword-only: a group of values that travels together is one object."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOST = 6


def _functions(tree: ast.Module):
    """(qualified name, public, node) of every function and method, nested ones included."""
    def walk(node: ast.AST, prefix: str, public: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                shown = public and not child.name.startswith("_")
                if not isinstance(child, ast.ClassDef):
                    yield name, shown, child
                yield from walk(child, f"{name}.", shown and isinstance(child, ast.ClassDef))
    yield from walk(tree, "", True)


def _counts(node: ast.FunctionDef) -> tuple[int, int]:
    """(positional parameters, all parameters), ``self`` and ``cls`` not counted."""
    args = node.args
    positional = [a.arg for a in (*args.posonlyargs, *args.args) if a.arg not in ("self", "cls")]
    extra = len(args.kwonlyargs) + (args.vararg is not None) + (args.kwarg is not None)
    return len(positional), len(positional) + extra


def test_no_function_takes_more_than_six_parameters():
    offenders = []
    for path in sorted((ROOT / "optima").glob("*.py")):
        for name, public, node in _functions(ast.parse(path.read_text(), filename=str(path))):
            positional, total = _counts(node)
            if total > MOST and not (public and positional <= MOST):
                offenders.append(f"{path.name}:{node.lineno} {name} ({total} parameters, {positional} positional)")
    assert offenders == []


def test_the_rule_sees_what_it_should():
    tree = ast.parse("def _private(a, b, c, d, e, f, g): pass\n"
                     "def entry(a, b, c, d, e, f, *, g=0, h=0): pass\n"
                     "def wide(a, b, c, d, e, f, g): pass\n"
                     "class C:\n    def method(self, a, b, c, d, e, f): pass\n")
    found = {name: (public, _counts(node)) for name, public, node in _functions(tree)}
    assert found == {"_private": (False, (7, 7)), "entry": (True, (6, 8)), "wide": (True, (7, 7)),
                     "C.method": (True, (6, 6))}
