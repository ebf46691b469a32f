"""Faults lose nothing and say one line (issue 20): each test runs the CLI the way a user meets the fault
and checks the exit code, that stderr is one line naming the thing, and that nothing finished is lost."""
from __future__ import annotations

import csv
import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from autoprune.cli import main

# ----------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def write_spec(folder: Path, base: Path | None, **changes) -> Path:
    spec = {"study": "t", "model": "small_cnn", "data": "digits", "device": "cpu", "seed": 0,
            "budget": {"max_trials": 2}, "early_stop": {"enabled": False},
            "space": {"method": "l1", "target": {"low": 0.3, "high": 0.8}, "allocation": "global", "epochs": 1,
                      "lr": 0.01, "batch_size": 256}}
    if base is not None:
        spec["base"] = str(base)
    spec.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def finished(base_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """A search of 2 complete trials, run through the CLI (spec path, results folder)."""
    folder = tmp_path_factory.mktemp("faults")
    spec = write_spec(folder, base_ckpt)
    out = folder / "out"
    assert main(["search", str(spec), "--out", str(out), "--no-progress"]) == 0
    assert [r["state"] for r in rows(out)] == ["complete", "complete"]
    return spec, out


@pytest.fixture
def study(finished, tmp_path) -> tuple[Path, Path]:
    spec, out = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".*.lock"))
    return spec, copy


# ----------------------------------------------------------------------------- data loss


def test_1_missing_or_corrupt_study_storage_is_refused_and_nothing_is_lost(study, capsys):
    spec, out = study
    before = (out / "trials.csv").read_text()
    (out / "study.db").unlink()
    assert main(["search", str(spec), "--out", str(out), "--resume", "--max-trials", "3", "--no-progress"]) == 2
    one_line(capsys, "study.db is missing", "trials.csv holds 2 trials")
    assert (out / "trials.csv").read_text() == before
    (out / "study.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 50)  # truncated
    assert main(["search", str(spec), "--out", str(out), "--resume", "--no-progress"]) == 2
    one_line(capsys, "damaged or unreadable", "trials.csv (2 trials) is intact")
    assert (out / "trials.csv").read_text() == before and len(list((out / "models").iterdir())) == 2


def test_2_a_resume_with_another_base_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    spec = write_spec(tmp_path, None, base_epochs=2, budget={"max_trials": 1})  # the search trains its base
    assert main(["search", str(spec), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    original = torch.load(out / "base.pt", weights_only=True)
    (out / "base.pt").unlink()
    assert main(["search", str(spec), "--out", str(out), "--resume", "--seed", "1", "--max-trials", "2",
                 "--no-progress"]) == 2
    one_line(capsys, "base.pt is missing", "restore it")  # refused before training another base
    assert not (out / "base.pt").exists()
    other = dict(original)  # the same architecture with other weights, copied in by hand
    other["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in original["state_dict"].items()}
    torch.save(other, out / "base.pt")
    assert main(["search", str(spec), "--out", str(out), "--resume", "--max-trials", "2", "--no-progress"]) == 2
    one_line(capsys, "differs from the base model this study's 1 trials were pruned from", "weights")
    assert len(rows(out)) == 1
    torch.save(original, out / "base.pt")  # the original back: the study continues
    assert main(["search", str(spec), "--out", str(out), "--resume", "--max-trials", "2", "--no-progress"]) == 0
    assert [r["state"] for r in rows(out)] == ["complete", "complete"]


def test_3_report_files_are_never_left_half_written(study, monkeypatch, capsys):
    _, out = study
    before = {n: (out / n).read_bytes() for n in ("pareto.csv", "pareto.png", "pareto.html", "report.md")}
    from autoprune import files

    real = files.os.replace

    def full_disk(src, dst):
        if str(dst).endswith((".png", ".md")):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", full_disk)
    assert main(["pareto", str(out)]) == 2
    one_line(capsys, "No space left on device", "free some space")
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name  # old or complete, never truncated
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_4_a_trial_whose_result_cannot_be_recorded_leaves_no_orphan(base_ckpt, tmp_path, monkeypatch, capsys):
    from autoprune.search import optuna_backend

    real = optuna_backend.OptunaStore.record
    calls = []

    def record(self, number, result):
        calls.append(number)
        if len(calls) == 2:  # the model of trial 1 is saved, then its result cannot be stored
            raise OSError(errno.ENOSPC, "No space left on device", "study.db")
        return real(self, number, result)

    monkeypatch.setattr(optuna_backend.OptunaStore, "record", record)
    out = tmp_path / "out"
    spec = write_spec(tmp_path, base_ckpt, budget={"max_trials": 3})
    assert main(["search", str(spec), "--out", str(out), "--no-progress"]) == 2
    one_line(capsys, "No space left on device")
    monkeypatch.setattr(optuna_backend.OptunaStore, "record", real)
    table = rows(out)
    assert [r["state"] for r in table] == ["complete", "interrupted"] and table[1]["error"].startswith("interrupted")
    assert sorted(p.name for p in (out / "models").iterdir()) == ["trial_0000.pt"]
    assert main(["search", str(spec), "--out", str(out), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    table = rows(out)
    complete = {r["model"] for r in table if r["state"] == "complete"}
    assert len(complete) == 3 and {f"models/{p.name}" for p in (out / "models").iterdir()} == complete


def test_5_ctrl_c_while_a_trial_is_set_up_is_an_interrupt(base_ckpt, tmp_path, monkeypatch, capsys):
    from autoprune.search import space

    real = space.suggest
    calls = []

    def suggest(trial, spec):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(trial, spec)

    monkeypatch.setattr(space, "suggest", suggest)
    out = tmp_path / "out"
    spec = write_spec(tmp_path, base_ckpt, budget={"max_trials": 2})
    assert main(["search", str(spec), "--out", str(out), "--no-progress"]) == 130
    capsys.readouterr()
    monkeypatch.setattr(space, "suggest", real)
    table = rows(out)
    assert [r["state"] for r in table] == ["complete", "interrupted"] and table[1]["error"].startswith("interrupted")
    assert main(["search", str(spec), "--out", str(out), "--resume", "--no-progress"]) == 0  # not counted
    capsys.readouterr()
    assert [r["state"] for r in rows(out)] == ["complete", "interrupted", "complete"]


# ----------------------------------------------------------------------------- one line, exit 2


def test_6_out_is_a_file_or_not_writable(study, tmp_path, monkeypatch, capsys):
    spec, out = study
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["search", str(spec), "--out", str(afile), "--no-progress"]) == 2
    one_line(capsys, str(afile), "is a file")
    from autoprune.search import folder

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(folder.Path, "write_text", read_only)
    assert main(["search", str(spec), "--out", str(tmp_path / "ro"), "--no-progress"]) == 2
    one_line(capsys, "Read-only file system", "choose a writable --out")
    monkeypatch.undo()

    def no_write(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", no_write)
    assert main(["retrain", str(out), "--trial", "0", "--epochs", "0", "--out", str(tmp_path / "rt"),
                 "--no-progress"]) == 2
    one_line(capsys, "Permission denied")


def test_8_a_garbage_trials_csv_is_one_line_for_pareto_and_retrain(study, capsys):
    _, out = study
    (out / "trials.csv").write_bytes(b'"unterminated,\x00\xff\n1,2,3,4\n5\n')
    assert main(["pareto", str(out)]) == 2
    one_line(capsys, "trials.csv")
    assert main(["retrain", str(out), "--pick", "best", "--epochs", "0"]) == 2
    one_line(capsys, "trials.csv")


def test_9_a_search_that_failed_before_its_first_trial_can_be_corrected(base_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    bad = write_spec(tmp_path / "bad", None, base_epochs=1, base_lr=1.0e6)
    assert main(["search", str(bad), "--out", str(out), "--no-progress"]) == 2
    one_line(capsys, "training the base model failed", "lower base_lr")
    assert (out / "spec.yaml").exists()
    good = write_spec(tmp_path / "good", base_ckpt, budget={"max_trials": 1})
    assert main(["search", str(good), "--out", str(out), "--no-progress"]) == 0
    assert [r["state"] for r in rows(out)] == ["complete"]


def test_10_a_search_in_which_every_trial_failed_exits_2(base_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    spec = write_spec(tmp_path, base_ckpt, space={"method": "l1", "target": 0.5, "epochs": 1, "lr": 1.0e30})
    assert main(["search", str(spec), "--out", str(out), "--no-progress"]) == 2
    err = one_line(capsys, "all 2 trials failed", "(2x)", "NonFiniteLoss", "lower space.lr in")
    assert "--lr" not in err and "mixed precision" not in err  # only what the user can change, on a CPU
    assert (out / "report.md").exists() and len(rows(out)) == 2


# ----------------------------------------------------------------------------- accepted without a word


def test_11_empty_out_duplicate_keys_and_empty_pick_are_rejected(study, tmp_path, capsys, monkeypatch):
    spec, out = study
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(spec), "--out", "", "--no-progress"]) == 2
    one_line(capsys, "--out is empty")
    assert not (tmp_path / "study.db").exists()
    dup = tmp_path / "dup.yaml"
    dup.write_text("model: small_cnn\ndata: digits\nspace:\n  lr: 0.1\n  epochs: 1\n  lr: 0.2\n")
    assert main(["search", str(dup), "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    one_line(capsys, "dup.yaml", "line 6", "'lr' is given twice (first at line 4)")
    for rule in ("", ",,", " , "):
        assert main(["retrain", str(out), "--pick", rule, "--epochs", "0"]) == 2
        one_line(capsys, "pick rule", "is empty")


def npz(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


@pytest.mark.parametrize("case, needle", [
    ("nan", "NaN values in 1 of 60 samples"),
    ("inf", "inf values in 1 of 60 samples"),
    ("few", "has 3 samples"),
    ("one_class", "one class"),
    ("big_label", "the largest is 100000"),
    ("corrupt", "not a readable .npz"),
])
def test_12_data_is_validated_on_load(case, needle, tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.random((60, 8, 8)).astype(np.float32)
    y = np.arange(60) % 3
    path = tmp_path / f"{case}.npz"
    if case == "nan":
        x[7, 1, 1] = np.nan
    elif case == "inf":
        x[7, 1, 1] = np.inf
    elif case == "few":
        x, y = x[:3], y[:3]
    elif case == "one_class":
        y = np.zeros(60, dtype=int)
    elif case == "big_label":
        y[5] = 100000
    data = npz(path, x, y)
    if case == "corrupt":
        path.write_bytes(path.read_bytes()[:100])
    assert main(["train", "--model", "small_cnn", "--data", data, "--epochs", "1", "--out",
                 str(tmp_path / "m.pt")]) == 2
    err = one_line(capsys, needle, str(path))
    assert "allow_pickle" not in err


def test_13_export_atol_and_the_search_summary(study, capsys):
    _, out = study
    assert main(["export", str(out / "models" / "trial_0000.pt"), "--format", "torchscript", "--atol=-1"]) == 2
    one_line(capsys, "--atol must be >= 0")
    from autoprune.cli.search import outcome_counts

    table = [{"state": "complete", "error": ""}, {"state": "failed", "error": "interrupted: the process ..."},
             {"state": "failed", "error": "ValueError: x"}]
    assert outcome_counts(table) == {"complete": 1, "interrupted": 1, "failed": 1}


def test_an_environment_error_in_a_trial_stops_the_search_instead_of_failing_every_trial(
        base_ckpt, tmp_path, monkeypatch, capsys):
    from autoprune.search import trial as trial_mod

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "models/trial_0000.pt")

    monkeypatch.setattr(trial_mod, "save_pruned", full)
    out = tmp_path / "out"
    assert main(["search", str(write_spec(tmp_path, base_ckpt, budget={"max_trials": 3})), "--out", str(out),
                 "--no-progress"]) == 2
    one_line(capsys, "No space left on device")
    assert [r["state"] for r in rows(out)] == ["interrupted"] and rows(out)[0]["error"].startswith("interrupted")
    assert not os.path.exists(out / "models" / "trial_0000.pt")


@pytest.mark.parametrize("where", ["build", "forward"])
def test_8_a_user_model_that_raises_is_one_line(where, tmp_path, monkeypatch, capsys):
    name = f"usermodel_broken_{where}"  # one module per case: Python caches imports
    (tmp_path / f"{name}.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(1, 4, 3)\n"
        "    def forward(self, x):\n"
        "        raise ValueError('forward is broken')\n"
        "def build(num_classes=10, in_channels=1, image_size=8):\n"
        f"    if {where == 'build'!r}:\n"
        "        raise RuntimeError('build is broken')\n"
        "    return M()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = write_spec(tmp_path / "s", None, model=f"{name}:build", base_epochs=1)
    assert main(["search", str(spec), "--out", str(tmp_path / "out"), "--no-progress", "--trust-code", name]) == 2
    one_line(capsys, f"{name}:build", f"{where} is broken", "-v shows the traceback")


# ----------------------------------------------------------------------------- train / prune / import CLI


@pytest.mark.parametrize("value", ["a,b", "1,,2", ","])
def test_8_prune_multipliers_that_are_not_numbers_are_one_line(base_ckpt, tmp_path, capsys, value):
    assert main(["prune", "--base", str(base_ckpt), "--allocation", "searched", "--multipliers", value,
                 "--epochs", "0", "--out", str(tmp_path / "p.pt")]) == 2
    one_line(capsys, "--multipliers", "comma-separated list of positive numbers")
    assert not (tmp_path / "p.pt").exists()


@pytest.mark.parametrize("command", ["prune", "train"])
def test_11_negative_epochs_are_rejected(base_ckpt, tmp_path, capsys, command):
    args = (["prune", "--base", str(base_ckpt)] if command == "prune" else ["train", "--model", "small_cnn"])
    assert main([*args, "--epochs", "-1", "--out", str(tmp_path / "m.pt")]) == 2
    one_line(capsys, "--epochs must be 0 or more")


def test_6_a_full_disk_while_saving_a_checkpoint_is_one_line_for_every_command(base_ckpt, tmp_path, capsys,
                                                                               monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "p.pt"))

    monkeypatch.setattr(torch, "save", full)
    assert main(["prune", "--base", str(base_ckpt), "--epochs", "0", "--out", str(tmp_path / "p.pt")]) == 2
    one_line(capsys, "No space left on device")
