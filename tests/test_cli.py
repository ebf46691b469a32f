"""The command line itself: help and defaults for every option, --version, `methods` parameter help,
a closed pipe, quiet third-party loggers, the README's claims about common options, metrics files
named after their checkpoint and no silent overwrites."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autoprune import __version__
from autoprune.cli import build_parser, configure_logging, main
from autoprune.cli.basic import metrics_path, param_help
from autoprune.methods import get_method, list_methods

REPO = Path(__file__).resolve().parents[1]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_shows_its_default():
    for name, sub in _subparsers().items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest} has no help"
            shown = formatter._expand_help(action)  # what --help prints for this option
            if action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
                assert "default" in shown, f"{name} {action.option_strings[-1]}: help does not show its default"
        sub.format_help()  # every help string formats (no stray % signs)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"autoprune {__version__}"


def test_methods_explains_every_parameter_in_one_line(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in list_methods():
        method = get_method(name)
        notes = param_help(method.Params)
        for f in __import__("dataclasses").fields(method.Params):
            assert notes.get(f.name), f"{name}.{f.name} has no one-line help"
            assert f"{f.name}={f.default!r}" in out and notes[f.name] in out
    assert param_help(get_method("resrep").Params)["penalty"].startswith("lambda")


def test_closed_pipe_ends_quietly():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "autoprune", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `| head` that has read what it wanted
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_verbose_does_not_open_third_party_debug_logs():
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        configure_logging(verbose=True)
        assert logging.getLogger("autoprune.search").isEnabledFor(logging.DEBUG)
        for name in ("matplotlib", "matplotlib.font_manager", "PIL", "urllib3", "optuna"):
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
        configure_logging(verbose=False)
        assert not logging.getLogger("autoprune").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logging.getLogger("autoprune").setLevel(logging.NOTSET)


def test_readme_says_exactly_which_commands_take_device_and_seed():
    readme = (REPO / "README.md").read_text()
    match = re.search(r"The commands that compute \(([^)]*)\) take `--device", readme)
    assert match, "README lost its sentence on --device/--seed"
    claimed = set(re.findall(r"`(\w+)`", match.group(1)))
    subs = _subparsers()
    having = {n for n, p in subs.items() if {"--device", "--seed"} <= set(p._option_string_actions)}
    assert claimed == having
    assert all("-v" in p._option_string_actions for p in subs.values())


def test_train_and_prune_write_metrics_named_after_the_checkpoint_and_never_overwrite(tmp_path, capsys):
    base, pruned = tmp_path / "base.pt", tmp_path / "pruned.pt"
    assert main(["train", "--model", "small_cnn", "--epochs", "1", "--augment", "--out", str(base)]) == 0
    assert main(["prune", "--base", str(base), "--method", "l1", "--target", "0.5", "--epochs", "1",
                 "--out", str(pruned)]) == 0
    assert metrics_path(base) == tmp_path / "base.metrics.json"
    train_m = json.loads((tmp_path / "base.metrics.json").read_text())
    prune_m = json.loads((tmp_path / "pruned.metrics.json").read_text())
    assert train_m["augment"] == ["crop"]  # digits: crops, never mirrored
    assert train_m["train_config"]["augment"] == ["crop"] and "macs_frac" in prune_m
    assert "augmentation: crop" in capsys.readouterr().out
    stamp = base.stat().st_mtime_ns
    assert main(["train", "--model", "small_cnn", "--epochs", "1", "--out", str(base)]) == 2
    err = capsys.readouterr().err
    assert "base.pt already exists; pass --force" in err and len(err.strip().splitlines()) == 1
    assert base.stat().st_mtime_ns == stamp
    assert main(["prune", "--base", str(base), "--out", str(pruned)]) == 2
    assert main(["train", "--model", "small_cnn", "--epochs", "1", "--out", str(base), "--force"]) == 0
    assert main(["train", "--model", "small_cnn", "--augment", "mirror", "--out", str(tmp_path / "x.pt")]) == 2
    assert "unknown augmentation 'mirror'" in capsys.readouterr().err


def test_retrain_help_has_force_and_named_augmentations():
    sub = _subparsers()["retrain"]
    assert "--force" in sub._option_string_actions
    args = build_parser().parse_args(["retrain", "DIR", "--trial", "1", "--augment"])
    assert args.augment == "auto" and args.force is False
