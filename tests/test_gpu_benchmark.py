"""The GPU benchmark's dry run: every part of ``python -m autoprune.benchmarks.gpu`` runs on the CPU, so the
script cannot rot while no GPU is at hand (it has not run on one yet; see README "GPU")."""
from __future__ import annotations

import csv

import pytest
import torch

from autoprune.benchmarks import gpu
from autoprune.benchmarks.gpu_methods import traffic


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow  # ~10 s on 2 idle cores, ~25 s on busy ones (CI runs it: it runs every test)
def test_dry_run_runs_every_part_and_writes_its_tables(tmp_path):
    assert gpu.main(["--dry-run", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "gpu_dry_run.md").read_text()
    assert "Device: CPU (dry run" in md and "commit" in md
    assert not (tmp_path / "gpu.md").exists()  # a dry run never overwrites the GPU tables
    status = {r["part"]: r["status"] for r in _rows(tmp_path / "gpu_dry_run_status.csv")}
    assert status == dict.fromkeys(gpu.PARTS, "ok")
    training = _rows(tmp_path / "gpu_dry_run.csv")
    assert len(training) == 4 and all(float(r["base img/s"]) > 0 and float(r["pruned img/s"]) > 0 for r in training)
    inference = _rows(tmp_path / "gpu_dry_run_inference.csv")
    assert {r["batch"] for r in inference} == {"1", "8"} and all(float(r["pruned ms"]) > 0 for r in inference)
    methods = _rows(tmp_path / "gpu_dry_run_methods.csv")
    assert {(r["method"], r["precision"]) for r in methods} == {(m, p) for m in ("l1", "lrf", "fsm", "resrep")
                                                                for p in ("bf16", "fp16")}
    assert all(r["checks"] == "pass" and r["finite"] == "True" for r in methods)
    assert all(0.45 < float(r["MACs kept"]) <= 0.5 for r in methods)
    by_method = {r["method"]: r["on device"] for r in methods}
    assert by_method["lrf"] == "LRF feature covariances: cpu" and by_method["fsm"] == "FSM moments: cpu"
    assert "fold rel. error" in by_method["resrep"]
    search = _rows(tmp_path / "gpu_dry_run_search.csv")
    assert [(r["backend"], r["workers"], r["trials done"], r["failed"]) for r in search] == [("optuna", "1", "2", "0")]
    assert float(search[0]["trials/min (wall)"]) > 0 and search[0]["note"] == "stopped: max_trials"
    latency = _rows(tmp_path / "gpu_dry_run_latency.csv")
    row = latency[0]
    assert [r["batch"] for r in latency] == ["1"]
    assert float(row["base ms"]) > 0 and -1 <= float(row["Spearman"]) <= 1 and float(row["MACs 0.5: latency frac"]) > 0
    assert 0.5 <= float(row["latency target"]) <= 0.95
    if row["note"].startswith("latency floor"):  # a noisy 8x8 fit on a loaded CPU: mostly fixed cost, nothing to aim at
        assert float(row["note"].split()[2]) > float(row["latency target"]) - 0.02 and not row["measured latency frac"]
    else:
        assert not row["note"]
        assert float(row["predicted latency frac"]) <= float(row["latency target"]) + 1e-6  # the allocator met it
        assert float(row["measured latency frac"]) > 0


def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    def broken(run):
        raise RuntimeError("simulated CUDA error")

    monkeypatch.setitem(gpu.FUNCTIONS, "inference", broken)
    assert gpu.main(["--dry-run", "--out", str(tmp_path), "--parts", "inference", "latency"]) == 1
    status = _rows(tmp_path / "gpu_dry_run_status.csv")
    assert [(r["part"], r["status"]) for r in status] == [("inference", "FAILED"), ("latency", "ok")]
    assert status[0]["note"] == "RuntimeError: simulated CUDA error"


def test_without_a_gpu_the_full_run_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "Use --dry-run" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_traffic_counts_nothing_on_the_cpu_and_times_the_block():
    with traffic(torch.device("cpu")) as t:
        torch.randn(64, 64) @ torch.randn(64, 64)
    assert t.wall_s > 0 and t.dtoh == 0 and t.syncs == 0 and t.blocked_share == 0


def test_budget_shares_what_is_left_among_the_parts_still_to_run():
    b = gpu.Budget(100.0)
    b.start("methods", ["methods", "search", "latency"])
    assert b.left() == pytest.approx(100 * 0.25 / 0.7, abs=1.0)
    b.start("latency", ["latency"])
    assert b.left() == pytest.approx(100, abs=1.0)


def test_device_wrapper_installs_runs_and_packs_the_tables(tmp_path):
    """gpu_device.sh run, as the device tool calls it, with pip stubbed out (no wheels needed) and --dry-run."""
    import os
    import shutil
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    root = Path(gpu.__file__).resolve().parents[2]
    shim = tmp_path / "python"
    shim.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 0\nexec {sys.executable} "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "tree"
    (work / ".whl").mkdir(parents=True)
    (work / ".whl" / "fake-0-py3-none-any.whl").write_bytes(b"")
    (work / ".whl" / "COMMIT").write_text("abc1234\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(shim), "PYTHONPATH": str(root)}
    proc = subprocess.run(["bash", str(root / "autoprune/benchmarks/gpu_device.sh"), "run", "--dry-run", "--parts",
                           "latency"], cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "benchmark exit code 0" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu_dry_run.md", "gpu_tables.tar.gz", "log.txt"]
    with tarfile.open(out / "gpu_tables.tar.gz") as tar:
        assert {"./gpu_dry_run_status.csv", "./gpu_dry_run_latency.csv"} <= set(tar.getnames())
    assert "commit" in (out / "gpu_dry_run.md").read_text()


def test_a_copied_tree_without_git_takes_the_commit_from_the_environment(monkeypatch):
    import subprocess

    from autoprune.benchmarks import common

    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.delenv("AUTOPRUNE_COMMIT", raising=False)
    assert common._git_commit() == "no git"
    monkeypatch.setenv("AUTOPRUNE_COMMIT", "abc1234+changes")
    assert common._git_commit() == "commit abc1234+changes (copied tree)"
