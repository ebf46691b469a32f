"""Code-size rules of the engine and the methods (DESIGN.md section 8; issue 26): no function over
~60 lines of code (its docstring not counted) and no module over ~400 lines, checked with ``ast``.
No method runs a training loop of its own: methods hand hooks to the engine's loop."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "autoprune"
PACKAGES = ("engine", "methods")
MAX_FUNCTION = 60
MAX_MODULE = 410
# modules over the limit when this test was written, owned elsewhere: strict, so a split must remove them here
KNOWN: dict[str, str] = {}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py"))


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str) and len(body) > 1:
        body = body[1:]
    return fn.end_lineno - body[0].lineno + 1


def test_the_rule_sees_every_module():
    assert len(_modules()) >= 20 and {p.parent.name for p in _modules()} == set(PACKAGES)


def _cases() -> list:
    out = []
    for p in _modules():
        key = f"{p.parent.name}/{p.name}"
        marks = [pytest.mark.xfail(reason=KNOWN[key], strict=True)] if key in KNOWN else []
        out.append(pytest.param(p, id=key, marks=marks))
    return out


@pytest.mark.parametrize("path", _cases())
def test_functions_and_modules_are_short(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE, f"{path.name} has {len(source.splitlines())} lines"
    long = [f"{node.name} ({_code_lines(node)} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_FUNCTION]
    assert not long, f"{path.name}: {', '.join(long)}"


def test_no_method_calls_fit():
    """``grep -rn "fit(" autoprune/methods`` finds no training loop: no call of train.fit in a method."""
    calls = [f"{p.name}:{i}" for p in (ROOT / "methods").glob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"(?<![\w_])fit\(", line)]
    assert not calls, calls
