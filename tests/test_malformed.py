"""Malformed input, table-driven (issue 30, "Done when"): spec keys, CLI flags, data and files, each one
line on stderr starting ``error:``, exit code 2, and no traceback. Most run in-process through the CLI's
``main()``; a few through ``python -m autoprune`` where only a real process shows the fault (a path that
is not UTF-8, a thread count that used to crash torch).

Each case names a substring the message must contain (the value or key at fault, or the fix), so a
message that says something unrelated fails the test."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from test_faults import finished  # noqa: F401 - the module-scoped 2-trial study

from autoprune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

DELETE = object()


@dataclass
class Ctx:
    """Paths the cases use (one copy of the study per case, so cases cannot affect each other)."""

    tmp: Path
    base: Path
    study: Path
    spec: Path

    def npz(self, name: str, **arrays: Any) -> str:
        path = self.tmp / f"{name}.npz"
        np.savez(path, **arrays)
        return f"npz:{path}"

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def ckpt(self, name: str, **changes: Any) -> Path:
        obj = torch.load(self.base, weights_only=True)
        for key, value in changes.items():
            if value is DELETE:
                obj.pop(key, None)
            else:
                obj[key] = value
        path = self.tmp / name
        torch.save(obj, path)
        return path


@pytest.fixture
def ctx(finished, tmp_path) -> Ctx:  # noqa: F811
    spec, study = finished
    copy = tmp_path / "study"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns(".*.lock"))
    return Ctx(tmp_path, copy / "base.pt", copy, spec)


# ----------------------------------------------------------------------------------------- spec keys

BASE_SPEC = {"study": "t", "model": "small_cnn", "data": "digits", "device": "cpu", "seed": 0, "base_epochs": 1,
             "budget": {"max_trials": 1}, "early_stop": {"enabled": False},
             "space": {"method": "l1", "target": {"low": 0.3, "high": 0.8}, "allocation": "global", "epochs": 1,
                       "lr": 0.01, "batch_size": 256}}


def spec_with(key: str, value: Any) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(BASE_SPEC))
    *parents, last = key.split(".")
    node = spec
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return spec


SPEC_CASES: list[tuple[str, Any, str]] = [
    ("study", "", "study"),
    ("study", ["a"], "study"),
    ("modle", "small_cnn", "modle"),
    ("model", DELETE, "model"),
    ("model", 123, "model"),
    ("model", "nosuchmodel", "nosuchmodel"),
    ("model", "torchvision:nosuch", "nosuch"),
    ("model", "a b:c", "model"),
    ("model", "os:system", "--trust-code os"),
    ("data", DELETE, "data"),
    ("data", "nosuchdata", "nosuchdata"),
    ("data", 5, "data"),
    ("data", {"name": "digits", "seed": -1}, "seed"),
    ("data", {"name": "digits", "seed": 2 ** 75}, "seed"),
    ("data", {"name": "digits", "val_fraction": 1.5}, "val_fraction"),
    ("data", {"name": "digits", "val_fraction": 0.6, "test_fraction": 0.6}, "fraction"),
    ("data", {"name": "digits", "image_size": 100000}, "image_size"),
    ("data", {"name": "digits", "image_size": 0}, "image_size"),
    ("data", {"name": "digits", "bogus": 1}, "bogus"),
    ("data", "npz:missing.npz", "missing.npz"),
    ("data", "imagefolder:/nonexistent/imgs", "/nonexistent/imgs"),
    ("base", "missing.pt", "missing.pt"),
    ("base", "/", "is a folder"),
    ("base_epochs", -1, "base_epochs"),
    ("base_epochs", 10 ** 9, "base_epochs"),
    ("base_epochs", "ten", "base_epochs"),
    ("base_lr", 0, "base_lr"),
    ("base_lr", float("nan"), "base_lr"),
    ("base_lr", -0.1, "base_lr"),
    ("device", "tpu", "tpu"),
    ("device", "cuda:x", "cuda:x"),
    ("workers", 0, "workers"),
    ("workers", 100000, "workers"),
    ("workers", 2.5, "workers"),
    ("seed", -1, "seed"),
    ("seed", 2 ** 75, "seed"),
    ("seed", "abc", "seed"),
    ("sampler", "grid", "grid"),
    ("objectives", ["val_acc"], "objectives"),
    ("objectives", ["val_acc", "flops"], "flops"),
    ("objectives", "val_acc", "objectives"),
    ("constraints", {"min_val_acc": 1.5}, "min_val_acc"),
    ("constraints", {"max_macs_frac": 0}, "max_macs_frac"),
    ("constraints", {"foo": 1}, "foo"),
    ("budget", {"max_trials": 0}, "max_trials"),
    ("budget", {"max_trials": 10 ** 12}, "max_trials"),
    ("budget", {"max_trials": -3}, "max_trials"),
    ("budget", {"time": "5 parsecs"}, "time"),
    ("budget", {"time": -5}, "time"),
    ("budget", {"device_hours": -1}, "device_hours"),
    ("budget", {"bogus": 1}, "bogus"),
    ("early_stop", {"margin": -0.1}, "margin"),
    ("early_stop", {"min_epochs": -1}, "min_epochs"),
    ("early_stop", "maybe", "early_stop"),
    ("early_stop", {"foo": 1}, "foo"),
    ("screen", {"keep": 0}, "keep"),
    ("screen", {"keep": 1.5}, "keep"),
    ("allocation", {"min_ratio": 2}, "min_ratio"),
    ("allocation", {"round_to": 0}, "round_to"),
    ("allocation", {"foo": 1}, "foo"),
    ("space", "abc", "space"),
    ("space.method", ["nosuch"], "nosuch"),
    ("space.method", [], "method"),
    ("space.target", {"low": 0.9, "high": 0.1}, "target"),
    ("space.target", {"low": 0, "high": 0.5}, "target"),
    ("space.target", 1.5, "target"),
    ("space.target", {"low": 0.1, "high": 0.5, "step": 0.9}, "step"),
    ("space.target", {"lo": 0.1, "high": 0.5}, "target"),
    ("space.allocation", ["diagonal"], "diagonal"),
    ("space.buckets", 0, "buckets"),
    ("space.buckets", 1000, "buckets"),
    ("space.epochs", 0, "epochs"),
    ("space.epochs", 10 ** 9, "epochs"),
    ("space.epochs", {"low": 1, "high": 10 ** 9}, "epochs"),
    ("space.lr", -0.01, "lr"),
    ("space.lr", {"low": 0, "high": 0.1, "log": True}, "lr"),
    ("space.lr", float("inf"), "lr"),
    ("space.batch_size", 0, "batch_size"),
    ("space.batch_size", 10 ** 9, "batch_size"),
    ("space.distill", 2, "distill"),
    ("space.methods", {"nosuch": {}}, "nosuch"),
    ("space.methods", {"resrep": {"penaltyy": 1}}, "penaltyy"),
    ("space.methods", {"resrep": {"penalty": float("inf")}}, "penalty"),
    ("space.methods", {"resrep": {"penalty": -1}}, "penalty"),
    ("space.foo", 1, "foo"),
    ("augment", ["rotate"], "rotate"),
    ("train_subset", 0, "train_subset"),
    ("train_subset", -5, "train_subset"),
]


@pytest.mark.parametrize("key,value,needle", SPEC_CASES,
                         ids=[f"spec-{k}={str(v)[:20]}" for k, v, _ in SPEC_CASES])
def test_a_malformed_spec_key_is_one_line(key, value, needle, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_with(key, value)))
    check(capsys, main(["search", str(path), "--out", str(tmp_path / "out"), "--no-progress"]), needle)


SPEC_TEXTS = [
    ("duplicate key", b"model: small_cnn\nmodel: resnet20\ndata: digits\n", "given twice"),
    ("not UTF-8", "model: small_cnn\ndata: digits\nstudy: caf\u00e9\n".encode("latin-1"), "UTF-8"),
    ("empty", b"", "empty"),
    ("not YAML", b"model: [unclosed\n", "line"),
    ("a list", b"- 1\n- 2\n", "mapping"),
    ("a scalar", b"hello\n", "mapping"),
    ("tabs", b"model: small_cnn\ndata:\n\t- digits\n", "line"),
    ("binary", bytes(range(256)), "spec"),
]


@pytest.mark.parametrize("text,needle", [(t, n) for _, t, n in SPEC_TEXTS], ids=[i for i, _, _ in SPEC_TEXTS])
def test_a_malformed_spec_file_is_one_line(text, needle, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_bytes(text)
    check(capsys, main(["search", str(path), "--out", str(tmp_path / "out"), "--no-progress"]), needle)


# ----------------------------------------------------------------------------------------- CLI flags

Case = Callable[[Ctx], list[str]]


def _search(*extra: str) -> Case:
    return lambda c: ["search", str(c.spec), "--out", str(c.tmp / "out"), "--no-progress", *extra]


def _train(*extra: str) -> Case:
    return lambda c: ["train", "--model", "small_cnn", "--epochs", "1", "--out", str(c.tmp / "m.pt"), *extra]


def _prune(*extra: str) -> Case:
    return lambda c: ["prune", "--base", str(c.base), "--epochs", "0", "--out", str(c.tmp / "p.pt"), *extra]


def _retrain(*extra: str) -> Case:
    return lambda c: ["retrain", str(c.study), "--epochs", "0", "--no-progress", "--out", str(c.tmp / "r"), *extra]


def _export(*extra: str) -> Case:
    return lambda c: ["export", str(c.base), "--out", str(c.tmp / "m.onnx"), *extra]


FLAG_CASES: list[tuple[str, Case, str]] = [
    ("search --max-trials 0", _search("--max-trials", "0"), "max_trials"),
    ("search --max-trials -1", _search("--max-trials", "-1"), "max_trials"),
    ("search --max-trials 1e12", _search("--max-trials", str(10 ** 12)), "max_trials"),
    ("search --time-budget soon", _search("--time-budget", "soon"), "soon"),
    ("search --time-budget -5", _search("--time-budget", "-5"), "-5"),
    ("search --compute-budget soon", _search("--compute-budget", "soon"), "soon"),
    ("search --compute-budget 0", _search("--compute-budget", "0"), "compute"),
    ("search --device-hours -1", _search("--device-hours", "-1"), "device"),
    ("search --device-hours nan", _search("--device-hours", "nan"), "device"),
    ("search --workers 0", _search("--workers", "0"), "workers"),
    ("search --workers 100000", _search("--workers", "100000"), "workers"),
    ("search --threads 0", _search("--threads", "0"), "--threads"),
    ("search --threads 100000", _search("--threads", "100000"), "--threads"),
    ("search --threads abc", _search("--threads", "abc"), "--threads"),
    ("search --seed -1", _search("--seed", "-1"), "--seed"),
    ("search --seed 2**75", _search("--seed", str(2 ** 75)), "--seed"),
    ("search --seed abc", _search("--seed", "abc"), "--seed"),
    ("search --backend nope", _search("--backend", "nope"), "--backend"),
    ("search --sampler nope", _search("--sampler", "nope"), "--sampler"),
    ("search --address without ray", _search("--address", "127.0.0.1:6379"), "--backend ray"),
    ("search --device tpu", _search("--device", "tpu"), "tpu"),
    ("search --out ''", lambda c: ["search", str(c.spec), "--out", "", "--no-progress"], "--out"),
    ("search --out a file", lambda c: ["search", str(c.spec), "--out", str(c.base), "--no-progress"], "file"),
    ("search spec missing", lambda c: ["search", str(c.tmp / "nope.yaml")], "nope.yaml"),
    ("search spec is a folder", lambda c: ["search", str(c.tmp)], "folder"),
    ("search unknown flag", _search("--max-trails", "3"), "--max-trails"),
    ("search no spec", lambda c: ["search"], "spec"),
    ("train --epochs -1", _train("--epochs", "-1"), "--epochs"),
    ("train --epochs 1e9", _train("--epochs", str(10 ** 9)), "--epochs"),
    ("train --epochs x", _train("--epochs", "x"), "--epochs"),
    ("train --lr 0", _train("--lr", "0"), "--lr"),
    ("train --lr nan", _train("--lr", "nan"), "--lr"),
    ("train --lr -1", _train("--lr", "-1"), "--lr"),
    ("train --batch-size 0", _train("--batch-size", "0"), "--batch-size"),
    ("train --weight-decay -1", _train("--weight-decay", "-1"), "--weight-decay"),
    ("train --label-smoothing 1.5", _train("--label-smoothing", "1.5"), "--label-smoothing"),
    ("train --augment rotate", _train("--augment", "rotate"), "rotate"),
    ("train --split-seed -1", _train("--split-seed", "-1"), "--split-seed"),
    ("train --split-seed 2**75", _train("--split-seed", str(2 ** 75)), "--split-seed"),
    ("train --model nosuch", lambda c: ["train", "--model", "nosuch", "--out", str(c.tmp / "m.pt")], "nosuch"),
    ("train --data nosuch", _train("--data", "nosuchdata"), "nosuchdata"),
    ("train --out a folder", lambda c: ["train", "--model", "small_cnn", "--out", str(c.tmp), "--force"], "folder"),
    ("train --out exists", lambda c: ["train", "--model", "small_cnn", "--out", str(c.base)], "--force"),
    ("prune --target 0", _prune("--target", "0"), "target"),
    ("prune --target 1.5", _prune("--target", "1.5"), "target"),
    ("prune --target nan", _prune("--target", "nan"), "target"),
    ("prune --method nosuch", _prune("--method", "nosuch"), "nosuch"),
    ("prune --allocation nope", _prune("--allocation", "nope"), "nope"),
    ("prune --multipliers nan,1", _prune("--allocation", "searched", "--multipliers", "nan,1"), "--multipliers"),
    ("prune --multipliers -1,1", _prune("--allocation", "searched", "--multipliers", "-1,1"), "--multipliers"),
    ("prune --multipliers a,b", _prune("--allocation", "searched", "--multipliers", "a,b"), "--multipliers"),
    ("prune --min-ratio 2", _prune("--min-ratio", "2"), "min_ratio"),
    ("prune --round-to 0", _prune("--round-to", "0"), "--round-to"),
    ("prune --param penalty=inf", _prune("--method", "resrep", "--param", "penalty=inf"), "penalty"),
    ("prune --param nope=1", _prune("--param", "nope=1"), "nope"),
    ("prune --param x", _prune("--param", "x"), "KEY=VALUE"),
    ("prune --base missing", lambda c: ["prune", "--base", str(c.tmp / "no.pt"), "--out", str(c.tmp / "p.pt")],
     "no.pt"),
    ("prune --base a folder", lambda c: ["prune", "--base", str(c.tmp), "--out", str(c.tmp / "p.pt")], "folder"),
    ("prune --epochs -1", _prune("--epochs", "-1"), "--epochs"),
    ("prune --lr inf", _prune("--lr", "inf"), "--lr"),
    ("retrain --trial 99", _retrain("--trial", "99"), "99"),
    ("retrain contradicting --pick", _retrain("--pick", "macs_frac<=0.4,macs_frac>=0.6"), "macs_frac"),
    ("retrain --pick nonsense", _retrain("--pick", "nonsense"), "nonsense"),
    ("retrain --pick unknown column", _retrain("--pick", "speed>=3"), "speed"),
    ("retrain --pick empty", _retrain("--pick", ""), "empty"),
    ("retrain --epochs -1", _retrain("--trial", "0", "--epochs", "-1"), "epochs"),
    ("retrain --lr 0", _retrain("--trial", "0", "--lr", "0"), "lr"),
    ("retrain --batch-size 0", _retrain("--trial", "0", "--batch-size", "0"), "batch"),
    ("retrain --distill-alpha alone", _retrain("--trial", "0", "--distill-alpha", "0.5"), "--distill"),
    ("retrain --distill-alpha 2", _retrain("--trial", "0", "--distill", "--distill-alpha", "2"), "distill_alpha"),
    ("retrain --augment rotate", _retrain("--trial", "0", "--augment", "rotate"), "rotate"),
    ("retrain DIR missing", lambda c: ["retrain", str(c.tmp / "nope"), "--trial", "0"], "nope"),
    ("retrain DIR a file", lambda c: ["retrain", str(c.base), "--trial", "0"], "base.pt"),
    ("retrain --out a file", _retrain("--trial", "0", "--out", "FILE"), "file"),
    ("retrain no --trial/--pick", lambda c: ["retrain", str(c.study)], "--trial"),
    ("export --atol inf", _export("--atol", "inf"), "--atol"),
    ("export --atol -1", _export("--atol", "-1"), "--atol"),
    ("export --atol nan", _export("--atol", "nan"), "--atol"),
    ("export script to onnx", _export("--exporter", "script"), "--exporter"),
    ("export MODEL missing", lambda c: ["export", str(c.tmp / "nope.pt")], "nope.pt"),
    ("export MODEL a folder", lambda c: ["export", str(c.tmp)], "folder"),
    ("export --out a folder", lambda c: ["export", str(c.base), "--out", str(c.tmp), "--force"], "folder"),
    ("export --format nope", _export("--format", "nope"), "--format"),
    ("pareto DIR missing", lambda c: ["pareto", str(c.tmp / "nope")], "nope"),
    ("pareto DIR without trials", lambda c: ["pareto", str(c.tmp)], "trials.csv"),
    ("info without model", lambda c: ["info"], "--model"),
    ("info --model nosuch", lambda c: ["info", "--model", "nosuch"], "nosuch"),
    ("import without weights", lambda c: ["import", "--model", "small_cnn", "--out", str(c.tmp / "i.pt")],
     "state_dict"),
    ("import --state-dict missing", lambda c: ["import", "--model", "small_cnn", "--state-dict",
                                               str(c.tmp / "sd.pt"), "--out", str(c.tmp / "i.pt")], "sd.pt"),
    ("import --checkpoint with --model", lambda c: ["import", "--checkpoint", str(c.base), "--model", "small_cnn",
                                                    "--out", str(c.tmp / "i.pt")], "--model"),
    ("--trust-code bad", lambda c: ["info", "--model", "small_cnn", "--trust-code=../x"], "not a module name"),
    ("no command", lambda c: [], "COMMAND"),
    ("unknown command", lambda c: ["serch"], "serch"),
]


@pytest.mark.parametrize("build,needle", [(b, n) for _, b, n in FLAG_CASES], ids=[i for i, _, _ in FLAG_CASES])
def test_a_malformed_flag_is_one_line(build, needle, ctx, capsys):
    argv = [str(ctx.base) if a == "FILE" else a for a in build(ctx)]
    check(capsys, main(argv), needle)


# ----------------------------------------------------------------------------------------- data

rng = np.random.default_rng(0)
X = rng.random((60, 1, 8, 8)).astype(np.float32)
Y = np.arange(60) % 3

DATA_CASES: list[tuple[str, Callable[[Ctx], str], str]] = [
    ("labels 0,2,5", lambda c: c.npz("gaps", x=X, y=np.array([0, 2, 5] * 20)), "0..K-1"),
    ("complex pixels", lambda c: c.npz("cplx", x=X.astype(np.complex64), y=Y), "complex"),
    ("NaN pixels", lambda c: c.npz("nan", x=np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), y=Y),
     "NaN"),
    ("inf pixels", lambda c: c.npz("inf", x=np.where(np.arange(X.size).reshape(X.shape) == 5, np.inf, X), y=Y),
     "inf"),
    ("3 samples", lambda c: c.npz("few", x=X[:3], y=Y[:3]), "3 samples"),
    ("one class", lambda c: c.npz("one", x=X, y=np.zeros(60, int)), "one class"),
    ("float labels", lambda c: c.npz("flt", x=X, y=Y + 0.5), "label"),
    ("negative label", lambda c: c.npz("neg", x=X, y=Y - 1), "label"),
    ("x is 1-D", lambda c: c.npz("flat", x=X.reshape(-1)[:60], y=Y), "x"),
    ("x, y lengths differ", lambda c: c.npz("len", x=X, y=Y[:50]), "60"),
    ("no x", lambda c: c.npz("nox", images=X, y=Y), "x"),
    ("no y", lambda c: c.npz("noy", x=X, labels=Y), "y"),
    ("text file", lambda c: f"npz:{c.file('t.npz', b'hello')}", "npz"),
    ("empty file", lambda c: f"npz:{c.file('e.npz', b'')}", "npz"),
    ("object arrays", lambda c: c.npz("obj", x=np.array([X[0], "a"], dtype=object), y=Y[:2]), "npz"),
    ("string pixels", lambda c: c.npz("str", x=np.full((60, 1, 8, 8), "a"), y=Y), "x"),
    ("5-D x", lambda c: c.npz("5d", x=X[:, None], y=Y), "x"),
    ("image 1x100000", lambda c: c.npz("wide", x=np.zeros((12, 1, 1, 100000), np.float32), y=Y[:12]), "x"),
    ("empty image folder", lambda c: f"imagefolder:{(c.tmp / 'imgs').mkdir() or c.tmp / 'imgs'}", "imgs"),
    ("class folders without images", lambda c: f"imagefolder:{_empty_classes(c.tmp)}", "image"),
    ("npz missing", lambda c: f"npz:{c.tmp / 'nope.npz'}", "nope.npz"),
]


def _empty_classes(tmp: Path) -> Path:
    for name in ("a", "b"):
        (tmp / "cls" / name).mkdir(parents=True)
        (tmp / "cls" / name / "notes.txt").write_text("no image")
    return tmp / "cls"


@pytest.mark.parametrize("build,needle", [(b, n) for _, b, n in DATA_CASES], ids=[i for i, _, _ in DATA_CASES])
def test_malformed_data_is_one_line(build, needle, ctx, capsys):
    check(capsys, main(["info", "--model", "small_cnn", "--data", build(ctx)]), needle)


# ----------------------------------------------------------------------------------------- files


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


FILE_CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    ("checkpoint empty", lambda c: ["info", "--base", str(c.file("e.pt", b""))], "e.pt"),
    ("checkpoint random bytes", lambda c: ["info", "--base", str(c.file("r.pt", os.urandom(2048)))], "r.pt"),
    ("checkpoint text", lambda c: ["info", "--base", str(c.file("t.pt", b"hello"))], "t.pt"),
    ("checkpoint pickle with os.system", lambda c: ["info", "--base", str(c.file("x.pt", pickle.dumps(Evil())))],
     "system"),
    ("checkpoint torch.save of os.system", lambda c: ["info", "--base", str(_torch_evil(c))], "system"),
    ("checkpoint without format", lambda c: ["info", "--base", str(c.ckpt("nf.pt", format=DELETE))], "format"),
    ("checkpoint without model", lambda c: ["info", "--base", str(c.ckpt("nm.pt", model=DELETE))], "nm.pt"),
    ("checkpoint num_classes -1", lambda c: ["info", "--base", str(c.ckpt("nc.pt", model={
        "name": "small_cnn", "num_classes": -1, "in_channels": 1, "image_size": 8}))], "num_classes"),
    ("checkpoint wrong weights", lambda c: ["info", "--base", str(c.ckpt("w.pt", state_dict={
        "x": torch.zeros(1)}))], "weights do not fit"),
    ("checkpoint state_dict not a dict", lambda c: ["info", "--base", str(c.ckpt("sd.pt", state_dict=[1]))],
     "sd.pt"),
    ("checkpoint a list", lambda c: ["info", "--base", str(_saved(c, "l.pt", [1, 2]))], "l.pt"),
    ("pruned checkpoint bad plan", lambda c: ["export", str(c.ckpt("bp.pt", format="autoprune.pruned/1",
                                                                   plan={"keep": 5})), "--out",
                                              str(c.tmp / "bp.onnx")], "plan"),
    ("checkpoint is a folder", lambda c: ["info", "--base", str(c.tmp)], "folder"),
    ("checkpoint missing", lambda c: ["info", "--base", str(c.tmp / "no.pt")], "no.pt"),
    ("export checkpoint garbage", lambda c: ["export", str(c.file("g.pt", b"\x80\x02garbage"))], "g.pt"),
    ("prune a pruned checkpoint", lambda c: ["prune", "--base", str(min((c.study / "models").glob("*.pt"))),
                                             "--out", str(c.tmp / "pp.pt")], "pruned"),
    ("trials.csv garbage", lambda c: _damage(c, "trials.csv", b"\x00\xff garbage") + ["pareto", str(c.study)],
     "trials.csv"),
    ("trials.csv empty", lambda c: _damage(c, "trials.csv", b"") + ["retrain", str(c.study), "--trial", "0"],
     "trials"),
    ("spec.yaml empty (resume)", lambda c: _damage(c, "spec.yaml", b"") + [
        "search", str(c.spec), "--out", str(c.study), "--resume", "--no-progress"], "spec.yaml is empty"),
    ("spec.yaml not YAML (resume)", lambda c: _damage(c, "spec.yaml", b"model: [") + [
        "search", str(c.spec), "--out", str(c.study), "--resume", "--no-progress"], "not a YAML mapping"),
    ("study.db garbage (resume)", lambda c: _damage(c, "study.db", b"SQLite format 3\x00" + os.urandom(4000)) + [
        "search", str(c.spec), "--out", str(c.study), "--resume", "--no-progress"], "study.db"),
    ("study.db a folder (resume)", lambda c: _folder(c, "study.db") + [
        "search", str(c.spec), "--out", str(c.study), "--resume", "--no-progress"], "study.db"),
    ("base.pt missing (retrain)", lambda c: _remove(c, "base.pt") + ["retrain", str(c.study), "--trial", "0"],
     "base.pt"),
    ("base.pt garbage (retrain)", lambda c: _damage(c, "base.pt", b"junk") + ["retrain", str(c.study), "--trial",
                                                                            "0"], "base.pt"),
    ("trial model missing (retrain)", lambda c: _remove_models(c) + ["retrain", str(c.study), "--trial", "0"],
     "trial_0000"),
    ("state dict garbage (import)", lambda c: ["import", "--model", "small_cnn", "--state-dict",
                                               str(c.file("sd.pt", b"junk")), "--out", str(c.tmp / "i.pt")],
     "sd.pt"),
]


def _saved(c: Ctx, name: str, obj: Any) -> Path:
    torch.save(obj, c.tmp / name)
    return c.tmp / name


def _torch_evil(c: Ctx) -> Path:
    return _saved(c, "te.pt", {"format": "autoprune.base/1", "x": Evil()})


def _damage(c: Ctx, name: str, data: bytes) -> list[str]:
    (c.study / name).write_bytes(data)
    return []


def _folder(c: Ctx, name: str) -> list[str]:
    (c.study / name).unlink()
    (c.study / name).mkdir()
    return []


def _remove(c: Ctx, name: str) -> list[str]:
    (c.study / name).unlink()
    return []


def _remove_models(c: Ctx) -> list[str]:
    shutil.rmtree(c.study / "models")
    return []


@pytest.mark.parametrize("build,needle", [(b, n) for _, b, n in FILE_CASES], ids=[i for i, _, _ in FILE_CASES])
def test_a_malformed_file_is_one_line(build, needle, ctx, capsys):
    check(capsys, main(build(ctx)), needle)


# ----------------------------------------------------------------------------------------- real processes

PROCESS_CASES = [
    ("spec path not UTF-8", lambda tmp: [os.fsdecode(bytes(tmp) + b"/sp\xe9c.yaml")], "sp"),
    ("threads 100000", lambda tmp: ["info", "--model", "small_cnn", "--threads", "100000"], "--threads"),
    ("seed 2**75", lambda tmp: ["info", "--model", "small_cnn", "--seed", str(2 ** 75)], "--seed"),
]


@pytest.mark.parametrize("build,needle", [(b, n) for _, b, n in PROCESS_CASES], ids=[i for i, _, _ in PROCESS_CASES])
def test_malformed_input_in_a_real_process_is_one_line(build, needle, tmp_path):
    args = build(tmp_path)
    if args and not args[0].isidentifier():  # a spec path: write a valid spec there
        path = os.fsencode(args[0])
        with open(path, "wb") as fh:
            fh.write(yaml.safe_dump({**BASE_SPEC, "model": "nosuchmodel"}).encode())
        args = ["search", args[0], "--out", str(tmp_path / "out"), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "autoprune", *args], capture_output=True, env=env, timeout=300,
                          check=False)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert needle in err, err


def check(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}: {err}"
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert needle in err, (needle, err)


def test_the_table_holds_at_least_150_inputs():
    assert len(SPEC_CASES) + len(SPEC_TEXTS) + len(FLAG_CASES) + len(DATA_CASES) + len(FILE_CASES) \
        + len(PROCESS_CASES) >= 150
