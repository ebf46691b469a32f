"""Issue 17's seven failing public cases, one test each, with the value each must give."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from special_models import (
    AuxHeadNet,
    DeconvNet,
    LeNet5,
    ProjectionHeadNet,
    SEConvClassifier,
    SharedConvNet,
    TensorAttrNet,
)
from torch import nn

import autoprune
from autoprune.cli import main
from autoprune.engine.cost import count_macs, reference_macs
from autoprune.engine.graph import find_groups
from autoprune.engine.plan import load_base, load_pruned, read_checkpoint, save_base, save_pruned
from autoprune.errors import AutopruneError, CheckpointError
from autoprune.models.registry import ModelSpec

METHODS = ("l1", "lrf", "fsm")
pytestmark = pytest.mark.usefixtures("trust_special_models")


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


@pytest.mark.parametrize("method", METHODS)
def test_1_transposed_conv_is_counted_and_its_feeding_conv_is_not_cut(method):
    model = _model(DeconvNet)
    assert count_macs(model, (3, 8, 8)) == reference_macs(model, (3, 8, 8)) == 124_576  # was 87,712
    result = autoprune.prune(model, method, 0.5, input_shape=(3, 8, 8))
    measured = reference_macs(result.model, (3, 8, 8)) / 124_576
    assert result.macs_fraction == pytest.approx(measured, abs=1e-12)  # reported == measured (was 0.4935 / 0.3845)
    assert 0.5 - 4_618 / 124_576 <= measured <= 0.5  # within one channel of conv2 (3.7 % of the MACs each)
    assert result.model.conv1.out_channels == 8 and result.model.deconv.out_channels == 8
    groups = {g.name: g for g in find_groups(model, (3, 8, 8))}
    assert not groups["conv1"].prunable and "ConvTranspose2d 'deconv'" in groups["conv1"].reason
    assert groups["conv2"].prunable


def test_2_shared_module_groups_are_refused_with_the_reason_and_the_rest_is_pruned():
    model = _model(SharedConvNet)
    groups = {g.name: g for g in find_groups(model, (3, 8, 8))}
    for name in ("stem", "shared"):
        assert not groups[name].prunable and "'shared', which forward calls 2 times" in groups[name].reason
    assert groups["head"].prunable
    result = autoprune.prune(model, "l1", 0.7, input_shape=(3, 8, 8))
    assert result.model.head.out_channels < 32 and result.model.shared.out_channels == 16
    assert result.macs == reference_macs(result.model, (3, 8, 8))  # the shared conv counted twice
    assert 0.69 <= result.macs_fraction <= 0.7


@pytest.mark.parametrize("method", METHODS)
def test_3_training_only_branch_is_pruned_consistently(method):
    model = _model(AuxHeadNet)
    result = autoprune.prune(model, method, 0.5, input_shape=(3, 8, 8), allocation={"mode": "uniform"})
    pruned = result.model
    assert pruned.conv2.out_channels < 32  # the layer the auxiliary head reads is pruned ...
    assert pruned.aux[0].in_channels == pruned.conv2.out_channels  # ... and the head follows it
    pruned.train()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(pruned(x), y)  # the first training step after pruning (was a channel mismatch)
    loss.backward()
    assert pruned.aux[4].out_features == 10
    groups = {g.name: g for g in find_groups(model, (3, 8, 8))}
    assert groups["conv2"].train_consumers == ("aux.0",) and groups["conv2"].consumers == ("conv3",)
    assert not groups["aux.0"].prunable and "only in training" in groups["aux.0"].reason


@pytest.mark.parametrize("cls,head", [(SEConvClassifier, "classifier"), (ProjectionHeadNet, "fc")])
@pytest.mark.parametrize("method", METHODS)
def test_4_output_layer_comes_from_the_graph_not_registration_order(cls, head, method):
    model = _model(cls)
    groups = find_groups(model, (3, 8, 8))
    assert not any(m.module == head and m.dim == "out" for g in groups for m in g.members)
    result = autoprune.prune(model, method, 0.5, input_shape=(3, 8, 8))
    assert result.model(torch.randn(2, 3, 8, 8)).shape == (2, 10)  # was 5 or 4 classes
    assert result.model.get_submodule(head).weight.shape[0] == 10


def test_4_cli_trains_and_prunes_a_model_with_a_projection_head(tmp_path, capsys):
    base, pruned = tmp_path / "base.pt", tmp_path / "pruned.pt"
    assert main(["train", "--model", "special_models:projection_head_net", "--data", "digits", "--epochs", "1",
                 "--out", str(base), "--device", "cpu", "--trust-code", "special_models"]) == 0
    assert main(["prune", "--base", str(base), "--method", "fsm", "--target", "0.5", "--epochs", "1",
                 "--out", str(pruned), "--device", "cpu"]) == 0  # was IndexError: Target 5 is out of bounds
    model, _ = load_pruned(pruned)
    assert model.fc.out_features == 10


@pytest.mark.parametrize("method,allocation", [(m, "global") for m in ("l1", "lrf", "fsm")] + [("fsm", "uniform")])
def test_5_every_method_reaches_the_lenet5_target_within_1_percent(method, allocation):
    model = _model(LeNet5)
    result = autoprune.prune(model, method, 0.5, input_shape=(3, 32, 32), allocation={"mode": allocation})
    assert 0.49 <= result.macs_fraction <= 0.5  # FSM + global was 0.394 (conv1 cut to 2 channels)
    assert result.macs == reference_macs(result.model, (3, 32, 32))


@pytest.mark.parametrize("method", METHODS)
def test_5_coarse_groups_still_reach_the_target_within_1_percent(method):
    """SE block + 1x1-conv classifier: one channel of conv1 / conv2 costs 5.9 % / 2.9 % of the MACs, so the
    greedy fill stops 1.7 % short (L1 and FSM gave 0.4827); trading a channel between groups reaches it."""
    model = _model(SEConvClassifier)
    result = autoprune.prune(model, method, 0.5, input_shape=(3, 8, 8))
    assert 0.49 <= result.macs_fraction <= 0.5


def test_6_numpy_metrics_are_stored_as_plain_values(tmp_path):
    model = _model(ProjectionHeadNet)
    spec = ModelSpec("special_models:projection_head_net", 10, 3, 8)
    metrics = {"val_acc": np.float64(0.93), "epochs": np.int64(3), "curve": np.array([0.5, 0.75]),
               "nested": {"best": np.float32(0.5)}, "flag": np.bool_(True)}
    save_base(tmp_path / "base.pt", model, spec, metrics=metrics)
    _, ckpt = load_base(tmp_path / "base.pt")
    assert ckpt["metrics"] == {"val_acc": 0.93, "epochs": 3, "curve": [0.5, 0.75], "nested": {"best": 0.5},
                               "flag": True}
    assert type(ckpt["metrics"]["epochs"]) is int
    result = autoprune.prune(model, "l1", 0.5, input_shape=(3, 8, 8))
    save_pruned(tmp_path / "p.pt", result.model, spec, result.plan, metrics=metrics, extra={"x": np.int64(1)})
    _, ckpt = load_pruned(tmp_path / "p.pt")
    assert ckpt["metrics"]["val_acc"] == 0.93 and ckpt["extra"] == {"x": 1}
    with pytest.raises(CheckpointError, match=r"metrics\['bad'\] holds a object"):
        save_base(tmp_path / "bad.pt", model, spec, metrics={"bad": object()})


def test_6_a_file_with_numpy_values_reports_the_real_cause(tmp_path):
    path = tmp_path / "np.pt"
    torch.save({"format": "autoprune.base/1", "metrics": {"acc": np.float64(0.9)}}, path)
    with pytest.raises(CheckpointError, match="holds a numpy.*re-save it") as info:
        read_checkpoint(path)
    assert "corrupt" not in str(info.value) and "\n" not in str(info.value)


def test_7_tensor_attribute_with_autograd_history_is_copied():
    model = _model(TensorAttrNet)
    assert not model.scale.is_leaf
    result = autoprune.prune(model, "l1", 0.5, input_shape=(3, 8, 8))
    assert result.macs_fraction <= 0.5 and not model.scale.is_leaf  # the input model is untouched
    with torch.no_grad():
        assert result.model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_functional_matmuls_are_refused_in_one_line():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.w = nn.Parameter(torch.randn(10, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3)) @ self.w.t()

    with pytest.raises(AutopruneError, match="80 of .* MACs .* outside nn.Conv") as info:
        autoprune.prune(Functional(), "l1", 0.5, input_shape=(3, 8, 8))
    assert "\n" not in str(info.value)


def test_a_model_that_cannot_run_in_training_mode_is_still_pruned(caplog):
    class EvalOnly(ProjectionHeadNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                raise RuntimeError("this model is exported for inference only")
            return super().forward(x)

    torch.manual_seed(0)
    result = autoprune.prune(EvalOnly().eval(), "l1", 0.5, input_shape=(3, 8, 8))
    assert 0.49 <= result.macs_fraction <= 0.5
    assert "training mode" in caplog.text


def test_2_cli_info_lists_the_shared_module_groups_with_the_reason(capsys):
    assert main(["info", "--model", "special_models:shared_conv_net", "--data", "synthetic", "--device", "cpu",
                 "--trust-code", "special_models"]) == 0
    out = capsys.readouterr().out
    assert out.count("which forward calls 2 times") == 2 and "head" in out


def test_3_tracing_training_mode_leaves_bn_statistics_and_the_random_state_alone():
    model = _model(AuxHeadNet)
    model.aux.insert(2, nn.Dropout(0.5))  # training mode draws random numbers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    groups = find_groups(model, (3, 8, 8))
    drawn = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and any(g.train_consumers for g in groups)
