"""Retrain leftovers (issue 30, item 8): what a failed retrain left is replaced by the next one; the best
model of an interrupted one is kept until --force, and the interrupt's note says to pass it."""
from __future__ import annotations

import pytest
from test_faults import finished, one_line  # noqa: F401 - the module-scoped 2-trial study

from autoprune.cli import main
from autoprune.report import retrain as retrain_module
from autoprune.train import NonFiniteLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def args(study, out, *extra):
    return ["retrain", str(study), "--trial", "0", "--epochs", "1", "--no-progress", "--out", str(out), *extra]


def test_a_failed_retrain_leaves_nothing_that_blocks_the_next(finished, tmp_path, monkeypatch, capsys):  # noqa: F811
    _, study = finished
    out = tmp_path / "r"

    def diverge(*a, **k):
        raise NonFiniteLoss("the training loss is nan at epoch 1, step 3 (lr 1e+06)")

    monkeypatch.setattr(retrain_module, "fit", diverge)
    assert main(args(study, out)) == 2
    one_line(capsys, "nan")
    assert (out / "model.pt").exists()  # epoch 0's weights, unfinished
    (out / ".model.pt.otherhost.1.tmp").write_bytes(b"x")  # and a killed write's temporary
    monkeypatch.undo()
    assert main(args(study, out)) == 0  # no --force needed
    assert not (out / ".model.pt.otherhost.1.tmp").exists()
    assert (out / "metrics.json").exists()


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_retrain_needs_force_and_says_so(how, finished, tmp_path, monkeypatch, capsys):  # noqa: F811
    import os
    import signal

    _, study = finished
    out = tmp_path / "r"

    def stop(*a, **k):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler turns it into the interrupt
        raise KeyboardInterrupt

    monkeypatch.setattr(retrain_module, "fit", stop)
    assert main(args(study, out)) == 130
    assert "--force" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(args(study, out)) == 2
    one_line(capsys, "interrupted retrain", "--force")
    assert main(args(study, out, "--force")) == 0
