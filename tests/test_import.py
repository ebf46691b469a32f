"""`autoprune import`: a model trained elsewhere becomes a base checkpoint a search starts from."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml

import autoprune
from autoprune.cli import main
from autoprune.data.datasets import DataSpec, load_data
from autoprune.engine.plan import load_base, read_checkpoint
from autoprune.errors import AutopruneError, CheckpointError
from autoprune.search.results import read_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    """200 random 3x16x16 images of 10 classes: enough for a search to run, fast on a CPU."""
    rng = np.random.default_rng(0)
    y = np.arange(200) % 10
    x = rng.normal(size=(200, 3, 16, 16)).astype(np.float32) + y[:, None, None, None] * 0.3
    path = tmp_path_factory.mktemp("npz") / "tiny.npz"
    np.savez(path, x=x, y=y)
    return path


def _resnet18_state(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    for m in model.modules():  # non-trivial BN statistics, as in a trained model
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.slow
def test_import_round_trip_torchvision_resnet18_then_a_search(tiny_npz, tmp_path, capsys):
    original, weights = _resnet18_state(tmp_path)
    base = tmp_path / "base.pt"
    assert main(["import", "--model", "torchvision:resnet18", "--state-dict", str(weights),
                 "--data", f"npz:{tiny_npz}", "--out", str(base), "--device", "cpu"]) == 0
    assert "val accuracy" in capsys.readouterr().out
    model, ckpt = load_base(base)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))  # the base's logits are the original model's
    data = load_data(DataSpec(f"npz:{tiny_npz}"))
    assert ckpt["split_hash"] == data.split_hash
    assert ckpt["metrics"]["imported"]["source"] == "torchvision:resnet18"
    spec = {"study": "imp", "model": "torchvision:resnet18", "data": f"npz:{tiny_npz}", "base": str(base),
            "device": "cpu", "seed": 0, "budget": {"max_trials": 2}, "early_stop": {"enabled": False},
            "space": {"method": "l1", "target": 0.5, "allocation": "global", "epochs": 1, "lr": 0.01,
                      "batch_size": 32}}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    assert main(["search", str(spec_path), "--out", str(tmp_path / "study")]) == 0
    rows = read_rows(tmp_path / "study" / "trials.csv")
    # the space holds one configuration: it runs once, every later proposal reuses it (issue 25)
    ran = [r for r in rows if not r["duplicate_of"]]
    assert len(ran) == 1 and ran[0]["state"] == "complete"
    assert all(r["duplicate_of"] == ran[0]["number"] for r in rows if r is not ran[0])
    study_base, _ = load_base(tmp_path / "study" / "base.pt")
    with torch.no_grad():
        assert torch.equal(study_base(x), original(x))


def test_import_in_memory_module_and_public_save_base(tmp_path):
    data = load_data(DataSpec("digits"))
    torch.manual_seed(0)
    model = autoprune.models.registry.create_model(autoprune.models.registry.ModelSpec("small_cnn", 10, 1, 8)).eval()
    result = autoprune.import_model(model, data, tmp_path / "base.pt", name="small_cnn")
    loaded, ckpt = load_base(result.path)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert 0.0 <= result.val_acc <= 1.0 and ckpt["metrics"]["val_acc"] == result.val_acc
    assert ckpt["split_hash"] == data.split_hash
    autoprune.save_base(tmp_path / "b2.pt", model, result.spec, data, {"val_acc": result.val_acc})
    assert read_checkpoint(tmp_path / "b2.pt")["split_hash"] == data.split_hash


def test_import_refuses_what_it_cannot_rebuild(tmp_path):
    data = load_data(DataSpec("digits"))
    model = autoprune.models.registry.create_model(autoprune.models.registry.ModelSpec("small_cnn", 10, 1, 8))
    with pytest.raises(AutopruneError, match="needs name="):
        autoprune.import_model(model, data, tmp_path / "b.pt")
    with pytest.raises(AutopruneError, match="no weights for small_cnn"):
        autoprune.import_model("small_cnn", data, tmp_path / "b.pt")
    wrong = autoprune.models.registry.create_model(autoprune.models.registry.ModelSpec("small_cnn", 7, 1, 8))
    torch.save(wrong.state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="weights do not fit the architecture"):
        autoprune.import_model("small_cnn", data, tmp_path / "b.pt", state_dict=tmp_path / "w.pt")
    with pytest.raises(AutopruneError, match="weights=.* are for torchvision|is for torchvision"):
        autoprune.import_model("small_cnn", data, tmp_path / "b.pt", weights="DEFAULT")
    assert not (tmp_path / "b.pt").exists()


def test_cli_import_errors_are_one_line(tmp_path, capsys):
    assert main(["import", "--model", "small_cnn", "--state-dict", str(tmp_path / "missing.pt"),
                 "--out", str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: state_dict file") and err.count("\n") == 1
    assert main(["import", "--out", str(tmp_path / "b.pt")]) == 2
