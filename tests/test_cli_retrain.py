"""`autoprune retrain` on a small study: it refuses to replace an earlier retrained model without
--force, says which epoch it kept and why, and its exports carry the input recipe."""
from __future__ import annotations

import json

from test_retrain import study  # noqa: F401 - the module-scoped digits study fixture

from autoprune.cli import main
from autoprune.report.export_check import read_recipe


def test_retrain_reports_the_kept_epoch_refuses_to_overwrite_and_exports_the_recipe(study, tmp_path,  # noqa: F811
                                                                                    capsys):
    out = tmp_path / "r"
    argv = ["retrain", str(study), "--trial", "0", "--epochs", "2", "--lr", "0.005", "--out", str(out),
            "--device", "cpu", "--no-progress", "--exporter", "legacy"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    reason = m["retrain"]["best_reason"]
    assert reason and f"kept epoch {m['retrain']['best_epoch']} of 2: {reason}" in text
    assert read_recipe(out / "model.onnx").scale == 1 / 16 and read_recipe(out / "model.ts").data == "digits"
    stamp = (out / "model.pt").stat().st_mtime_ns
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a retrained model" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "model.pt").stat().st_mtime_ns == stamp
    assert main([*argv, "--force"]) == 0


def test_export_after_retrain_rewrites_retrains_own_export_but_never_another_models(study, tmp_path,  # noqa: F811
                                                                                    capsys):
    """The README's last step: `export .../model.pt --format onnx` where retrain already wrote model.onnx."""
    out = tmp_path / "r"
    assert main(["retrain", str(study), "--trial", "0", "--epochs", "1", "--out", str(out), "--device", "cpu",
                 "--no-progress", "--exporter", "legacy"]) == 0
    capsys.readouterr()
    assert main(["export", str(out / "model.pt"), "--format", "onnx", "--exporter", "legacy"]) == 0
    assert "same weights" in capsys.readouterr().err
    other = study / "models" / "trial_0000.pt"  # the trial's own model: other weights than the retrained one
    assert main(["export", str(other), "--format", "onnx", "--out", str(out / "model.onnx"),
                 "--exporter", "legacy"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
