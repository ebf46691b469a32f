"""Out of memory (issue 30, item 6): a trial that cannot allocate is recorded as ``out of memory`` with
the batch size to lower, the search goes on, and the report is written from what the trials left."""
from __future__ import annotations

import pytest
from test_faults import rows, write_spec

from autoprune.cli import main
from autoprune.search import trial

pytestmark = pytest.mark.usefixtures("one_thread")

CPU_MESSAGE = ("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to "
               "allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(CPU_MESSAGE)], ids=["MemoryError", "allocator"])
def test_a_trial_out_of_memory_is_recorded_and_the_search_goes_on(error, base_ckpt, tmp_path, monkeypatch, capsys):
    real = trial.fit
    calls = []

    def fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first trial's fine-tune cannot allocate
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(trial, "fit", fit)
    spec = write_spec(tmp_path, base_ckpt, budget={"max_trials": 2})
    assert main(["search", str(spec), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    first, second = rows(tmp_path / "out")
    assert first["state"] == "failed" and first["error"].startswith("out of memory at batch size 256")
    assert "space.batch_size" in first["error"] and "(e.g. 128)" in first["error"]
    assert second["state"] == "complete"
    assert (tmp_path / "out" / "report.md").exists()


def test_running_out_of_memory_in_the_report_keeps_the_trials(base_ckpt, tmp_path, monkeypatch, capsys):
    from autoprune.report import tables

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(tables, "write_report", no_memory)
    spec = write_spec(tmp_path, base_ckpt, budget={"max_trials": 1})
    assert main(["search", str(spec), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: out of memory while writing the report") and "autoprune pareto" in err[-1]
    assert [r["state"] for r in rows(tmp_path / "out")] == ["complete"]
