"""`timm:<name>` models at CIFAR size: built offline (no pretrained download), pruned to the target,
trained, saved and loaded, exported; what cannot be pruned is named; import of a user's timm weights."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TensorSplit

pytest.importorskip("timm")

import autoprune
from autoprune.cli import main
from autoprune.engine.graph import find_groups
from autoprune.engine.plan import save_pruned
from autoprune.errors import AutopruneError
from autoprune.models import ModelSpec, create_model
from autoprune.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")

SLOW = {"resnet18", "efficientnet_b0"}  # 11 M params / the ONNX export of 40 groups: tens of seconds here


def _split(n: int = 16) -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    return TensorSplit(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in ("resnet18", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002")])
def test_timm_model_prunes_trains_saves_loads_and_exports(name, tmp_path):
    from autoprune.report.export_check import export_checked

    spec = ModelSpec(f"timm:{name}", 10, 3, 32)
    model = create_model(spec).eval()
    groups = find_groups(model, (3, 32, 32))
    assert any(g.prunable for g in groups)
    for g in groups:
        assert g.prunable or g.reason  # what is not pruned says why
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no data: no BN recalibration (warned), fine for this check
        result = autoprune.prune(model, "l1", 0.5, spec=spec, groups=groups)
    assert abs(result.macs_fraction - 0.5) <= 0.01
    fit(result.model, _split(), None, TrainConfig(epochs=1, batch_size=8, lr=0.01), "cpu")
    save_pruned(tmp_path / "p.pt", result.model, spec, result.plan)
    loaded, _ = autoprune.load_pruned(tmp_path / "p.pt")
    x = torch.randn(2, 3, 32, 32)
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), result.model(x), atol=1e-5)
    check = export_checked(loaded, (3, 32, 32), tmp_path / "p.onnx", "onnx")
    assert check.ok


def test_timm_info_and_unprunable_groups_named_offline(capsys):
    assert main(["info", "--model", "timm:regnetx_002", "--data", "synthetic", "--all"]) == 0
    out = capsys.readouterr().out
    assert "model timm:regnetx_002: input 3x32x32, 10 classes" in out
    assert "): touches a grouped convolution" in out  # RegNet's group convs: named, not a traceback
    assert main(["info", "--model", "timm:resnet18"]) == 0  # the command (digits: 1 channel, 8x8)
    assert "channel groups" in capsys.readouterr().out


def test_unknown_timm_model_is_one_line_with_a_suggestion(capsys):
    with pytest.raises(AutopruneError, match=r"unknown timm model 'resnet81'.*did you mean"):
        create_model(ModelSpec("timm:resnet81", 10, 3, 32))
    assert main(["info", "--model", "timm:not_a_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown timm model") and err.count("\n") == 1


def test_import_a_users_timm_weights(tmp_path, capsys):
    import timm

    net = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10, in_chans=1)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    assert main(["import", "--model", "timm:mobilenetv3_small_100", "--state-dict", str(tmp_path / "w.pt"),
                 "--data", "digits", "--out", str(tmp_path / "base.pt")]) == 0
    assert "timm:mobilenetv3_small_100: val accuracy" in capsys.readouterr().out
    model, ckpt = autoprune.load_base(tmp_path / "base.pt")  # rebuilt by name, no trust needed
    assert ckpt["model"]["name"] == "timm:mobilenetv3_small_100"
    net.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), net(x), atol=1e-5)
