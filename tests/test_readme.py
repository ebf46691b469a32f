"""The README as a user meets it: every `autoprune ...` command in its shell blocks parses as written,
the cheap ones run, its Python blocks compile and name things that exist, and its timings say where
they were measured."""
from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest

from autoprune.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, re.DOTALL)


def _commands() -> list[list[str]]:
    """Every `autoprune ...` / `.venv/bin/autoprune ...` command of the README's bash blocks, as argv."""
    out = []
    for lang, block in BLOCKS:
        if lang != "bash":
            continue
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part, comments=True)
                if words and words[0].endswith("autoprune") and not words[0].startswith("pip"):
                    out.append([w for w in words[1:] if not w.startswith(">")][: _redirect(words[1:])])
    return out


def _redirect(words: list[str]) -> int:
    return next((i for i, w in enumerate(words) if w == ">"), len(words))


COMMANDS = _commands()


def test_the_readme_has_its_commands():
    names = {c[0] for c in COMMANDS}
    assert {"search", "retrain", "export", "prune", "train", "import", "pareto", "schema"} <= names
    flow = [c for c in COMMANDS if "results/digits_demo" in " ".join(c)]
    assert [c[0] for c in flow][:2] == ["retrain", "export"]  # the quick start's step 2


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_readme_command_parses_as_written(argv):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: a misspelt option or a missing argument
        pytest.fail(f"`autoprune {' '.join(argv)}` does not parse (exit {exc.code})")
    assert isinstance(args, argparse.Namespace)


def test_the_cheap_readme_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cheap = [c for c in COMMANDS if c[0] in ("schema", "models", "methods")]
    assert cheap
    for argv in cheap:
        assert main(argv) == 0, argv
    assert main(["info", "--model", "timm:resnet18"]) == 0  # the README's timm claim, offline
    assert "channel groups" in capsys.readouterr().out


def test_readme_python_blocks_compile_and_import_what_exists():
    import importlib

    blocks = [b for lang, b in BLOCKS if lang == "python"]
    assert len(blocks) >= 3
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autoprune"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "autoprune"):
                import autoprune

                assert hasattr(autoprune, node.attr), f"autoprune.{node.attr}"


def test_readme_timings_name_the_machine_and_the_demo_spec_tells_the_truth():
    top = README.split("## What a user does")[0]
    for m in re.finditer(r"(\d+(?:\.\d+)?) ?(s|min|minutes)\b", top):
        context = top[max(0, m.start() - 400): m.end() + 400]
        assert re.search(r"core|load|machine", context), f"a timing without its machine: {m.group(0)!r}"
    spec = (REPO / "search_spaces" / "digits_demo.yaml").read_text()
    assert "4 of" not in spec and "62 s" not in spec  # ResRep trains all 5 epochs (train_share 1)
    assert "--index-url https://download.pytorch.org/whl/cpu" in README  # the CPU-only install
