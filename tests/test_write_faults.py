"""A full disk or a read-only folder is one line and exit 2 everywhere, nothing finished is lost and no
temporary file stays behind (issue 30, item 3). The disks are real: small tmpfs mounts (skipped when
this process may not mount, e.g. not root)."""
from __future__ import annotations

import contextlib
import errno
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_faults import finished, one_line, rows, write_spec  # noqa: F401 - module-scoped 2-trial study

from autoprune.cli import main
from autoprune.files import clean_temps, save_torch

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "4m", readonly: bool = False) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        proc = None
    if proc is None or proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file (removed to free the space again)."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as fh:
        chunk = b"\0" * (1 << 16)
        with contextlib.suppress(OSError):
            while True:
                fh.write(chunk)
        with contextlib.suppress(OSError):
            while True:  # the last partial chunk
                fh.write(b"\0" * 512)
    return filler


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_full_models_folder_stops_the_search_and_spends_no_slot(base_ckpt, tmp_path, capsys):
    spec = write_spec(tmp_path, base_ckpt, budget={"max_trials": 2})
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    with tmpfs(out / "models", "1m") as models:
        filler = fill(models)
        assert main(["search", str(spec), "--out", str(out), "--no-progress"]) == 2
        one_line(capsys, "No space left on device", "free some space")
        assert not temps(out)
        assert [r["state"] for r in rows(out)] in ([], ["failed"], ["interrupted"])  # at most the interrupted one
        assert all("interrupted" in r["state"] + r["error"] for r in rows(out))
        filler.unlink()
        assert main(["search", str(spec), "--out", str(out), "--resume", "--no-progress"]) == 0
        done = [r for r in rows(out) if r["state"] == "complete"]
        assert len(done) == 2  # the slot of the trial that could not be saved was not spent
        assert not temps(out)


def test_a_read_only_models_folder_stops_at_the_first_trial(base_ckpt, tmp_path, capsys):
    spec = write_spec(tmp_path, base_ckpt, budget={"max_trials": 3})
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    with tmpfs(out / "models", "1m", readonly=True):
        assert main(["search", str(spec), "--out", str(out), "--no-progress"]) == 2
        one_line(capsys, "Read-only file system", "choose a writable --out")
        assert len(rows(out)) <= 1  # stopped at the first trial, not after running all three


def test_a_disk_that_fills_mid_search_is_one_line_and_keeps_the_finished_trials(base_ckpt, tmp_path, capsys,
                                                                                 monkeypatch):
    from autoprune.search import optuna_backend

    spec = write_spec(tmp_path, base_ckpt, budget={"max_trials": 3})
    out = tmp_path / "out"
    with tmpfs(out, "16m") as disk:
        real = optuna_backend.run_trial
        fillers = []

        def run_trial(worker, number, *args, **kwargs):
            result = real(worker, number, *args, **kwargs)
            if number == 1:  # trial 1 is trained and saved; then the disk fills
                fillers.append(fill(disk))
            return result

        monkeypatch.setattr(optuna_backend, "run_trial", run_trial)
        assert main(["search", str(spec), "--out", str(out), "--no-progress"]) == 2
        one_line(capsys, "free some space")
        kept = rows(out)
        assert [r["state"] for r in kept][:1] == ["complete"]  # trial 0 is kept
        assert not temps(out)
        monkeypatch.setattr(optuna_backend, "run_trial", real)
        fillers[0].unlink()
        assert main(["search", str(spec), "--out", str(out), "--resume", "--no-progress"]) == 0
        assert sum(r["state"] == "complete" for r in rows(out)) == 3
        assert rows(out)[0] == kept[0]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_export_to_a_full_disk_is_one_line_and_leaves_nothing(finished, tmp_path, capsys, fmt):  # noqa: F811
    _, study = finished
    trial = min((study / "models").glob("*.pt"))
    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk)
        target = disk / f"m.{'ts' if fmt == 'torchscript' else 'onnx'}"
        assert main(["export", str(trial), "--format", fmt, "--out", str(target)]) == 2
        err = one_line(capsys, "No space left on device", "free some space")
        assert "install" not in err
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no file, no sidecar, no temporary


def test_a_retrain_on_a_full_disk_is_one_line(finished, tmp_path, capsys):  # noqa: F811
    _, study = finished
    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk)
        assert main(["retrain", str(study), "--trial", "0", "--epochs", "1", "--no-progress",
                     "--out", str(disk / "r")]) == 2
        one_line(capsys, "No space left on device")
        assert not temps(disk)


def test_checkpoint_save_maps_the_os_error_and_removes_its_temporary(tmp_path, monkeypatch):
    import os

    real = os.replace

    def fail(src, dst):
        raise OSError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(Exception, match="Permission denied; choose a folder you may write to"):
        save_torch(tmp_path / "m.pt", {"x": 1})
    monkeypatch.setattr(os, "replace", real)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_cleaned_on_the_next_run(finished, tmp_path, capsys):  # noqa: F811
    spec, study = finished
    out = tmp_path / "out"
    shutil.copytree(study, out, ignore=shutil.ignore_patterns(".*.lock"))
    stale = [out / ".trials.csv.otherhost.123.tmp", out / "models" / "trial_0009.pt.tmp",
             out / "models" / ".trial_0009.pt.tmp", out / ".report.md.tmp"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    keep = out / "notes.tmp"  # not ours: left alone
    keep.write_text("mine")
    assert main(["search", str(spec), "--out", str(out), "--resume", "--max-trials", "2", "--no-progress"]) == 0
    assert not any(p.exists() for p in stale) and keep.exists()
    assert clean_temps(out, ("models",)) == []
