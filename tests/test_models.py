"""Model registry: every built-in model builds and runs, architectures have the published shape,
the torchvision: and package.module:function forms work, errors name the fix."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.models import registry as models
from autoprune.models.registry import ModelSpec, classifier_name, create_model, list_models, register
from autoprune.models.zoo import PadShortcut


def _convs(model: nn.Module, kernel: int) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (kernel, kernel)]


def test_registry_lists_the_built_in_models():
    expected = {f"resnet{d}{s}" for d in (20, 32, 56, 110) for s in ("", "_a")}
    expected |= {"vgg16_bn", "mobilenetv2", "small_cnn"}
    assert set(list_models()) == expected
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_every_registry_model_forwards_a_cifar_batch(name):
    torch.manual_seed(0)
    model = create_model(ModelSpec(name, num_classes=10, in_channels=3, image_size=32)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert isinstance(model.get_submodule(classifier_name(model)), nn.Linear)


def test_small_cnn_on_8x8_grayscale_digits():
    model = create_model(ModelSpec("small_cnn", num_classes=10, in_channels=1, image_size=8)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # the classifier reads a flattened 64 x 2 x 2 map: a Linear-after-flatten consumer
    assert model.get_submodule(classifier_name(model)).in_features == 64 * 4
    assert any(isinstance(m, nn.Flatten) for m in model.modules())


def test_small_cnn_skips_pooling_below_8_pixels():
    model = create_model(ModelSpec("small_cnn", 3, 1, 4)).eval()
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 3)


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_cifar_resnet_b_layer_counts(depth):
    # ResNet-(6n+2): stem conv + 3 stages x n blocks x 2 convs = 6n+1 3x3 convs, plus the Linear,
    # = depth weighted layers. The two 1x1 projection shortcuts (into stages 2 and 3) are counted
    # separately, as in the paper.
    model = create_model(ModelSpec(f"resnet{depth}", 10, 3, 32))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(_convs(model, 3)) + len(linears) == depth
    assert len(_convs(model, 1)) == 2
    assert not any(isinstance(m, PadShortcut) for m in model.modules())


def test_resnet56_has_55_convs_plus_one_linear():
    model = create_model(ModelSpec("resnet56", 10, 3, 32))
    assert len(_convs(model, 3)) == 55
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    assert [c.out_channels for c in _convs(model, 1)] == [32, 64]  # projection shortcuts, B option
    widths = sorted({c.out_channels for c in _convs(model, 3)})
    assert widths == [16, 32, 64]


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_option_a_resnets_use_pad_shortcuts_and_no_1x1_convs(depth):
    model = create_model(ModelSpec(f"resnet{depth}_a", 10, 3, 32))
    pads = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert [(p.in_channels, p.out_channels) for p in pads] == [(16, 32), (32, 64)]
    assert _convs(model, 1) == []
    assert len(_convs(model, 3)) == depth - 1


def test_pad_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_vgg16_bn_and_mobilenetv2_structure():
    vgg = create_model(ModelSpec("vgg16_bn", 10, 3, 32))
    assert len(_convs(vgg, 3)) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 13
    mnv2 = create_model(ModelSpec("mobilenetv2", 10, 3, 32)).eval()
    depthwise = [m for m in mnv2.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17  # one per inverted residual block
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    with torch.no_grad():  # CIFAR variant: 32x32 -> 8x8 final map (two stride-2 stages)
        assert mnv2.features(torch.randn(1, 3, 32, 32)).shape == (1, 1280, 8, 8)
    residual = [m for m in mnv2.modules() if getattr(m, "use_residual", False)]
    assert len(residual) == 10


def test_vgg16_bn_works_on_small_images():
    vgg = create_model(ModelSpec("vgg16_bn", 4, 1, 8)).eval()
    assert vgg(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_torchvision_resnet18_with_one_input_channel_and_7_classes():
    spec = ModelSpec("torchvision:resnet18", num_classes=7, in_channels=1, image_size=32)
    model = create_model(spec).eval()
    assert model.conv1.in_channels == 1
    assert (model.conv1.out_channels, model.conv1.kernel_size, model.conv1.stride) == (64, (7, 7), (2, 2))
    assert model.conv1.bias is None
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert classifier_name(model) == "fc"


def test_torchvision_first_conv_inside_a_sequential_is_replaced():
    model = create_model(ModelSpec("torchvision:mobilenet_v2", 5, 1, 32)).eval()
    assert model.features[0][0].in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_unknown_torchvision_model_raises():
    with pytest.raises(AutopruneError, match="resnet18"):
        create_model(ModelSpec("torchvision:resnet19", 10, 3, 32))


def test_unknown_model_lists_known_models_and_prefix_forms():
    with pytest.raises(AutopruneError) as info:
        create_model(ModelSpec("resnet21", 10, 3, 32))
    msg = str(info.value)
    assert "'resnet21'" in msg and "did you mean" in msg
    for name in list_models():
        assert name in msg
    assert "torchvision:<name>" in msg and "package.module:function" in msg
    assert "\n" not in msg


def test_user_model_from_package_module_function(tmp_path, monkeypatch):
    module_name = "autoprune_test_user_models"
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent("""
        from torch import nn

        def build(num_classes, in_channels, image_size):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    with pytest.raises(AutopruneError, match=f"--trust-code {module_name}"):  # autoprune.trust
        create_model(ModelSpec(f"{module_name}:build", num_classes=4, in_channels=2, image_size=5))
    monkeypatch.setenv("AUTOPRUNE_TRUST_CODE", f"{module_name},no_such_module_xyz")
    model = create_model(ModelSpec(f"{module_name}:build", num_classes=4, in_channels=2, image_size=5))
    assert model(torch.randn(3, 2, 5, 5)).shape == (3, 4)
    assert classifier_name(model) == "1"
    with pytest.raises(AutopruneError, match="missing_fn"):
        create_model(ModelSpec(f"{module_name}:missing_fn", 4, 2, 5))
    with pytest.raises(AutopruneError, match="NOT_CALLABLE"):
        create_model(ModelSpec(f"{module_name}:NOT_CALLABLE", 4, 2, 5))
    with pytest.raises(AutopruneError, match="no_such_module_xyz"):
        create_model(ModelSpec("no_such_module_xyz:build", 4, 2, 5))


def test_register_adds_a_factory(monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    @register("tiny_test_net")
    def tiny(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, num_classes))

    assert "tiny_test_net" in list_models()
    model = create_model(ModelSpec("tiny_test_net", 3, 1, 8))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError):
        register("bad:name")


def test_classifier_name():
    assert classifier_name(create_model(ModelSpec("small_cnn", 10, 1, 8))) == "classifier"
    assert classifier_name(create_model(ModelSpec("resnet20", 10, 3, 32))) == "fc"
    assert classifier_name(create_model(ModelSpec("torchvision:mobilenet_v2", 10, 3, 32))) == "classifier.1"
    assert classifier_name(create_model(ModelSpec("torchvision:vgg11", 10, 3, 32))) == "classifier.6"
    assert classifier_name(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 10, 1))) == "1"  # conv classifier
    with pytest.raises(AutopruneError, match="Linear or nn.Conv2d"):
        classifier_name(nn.Sequential(nn.ReLU()))


def test_model_spec_round_trip_and_validation():
    spec = ModelSpec("resnet20", 10, 3, 32)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict() == {"name": "resnet20", "num_classes": 10, "in_channels": 3, "image_size": 32}
    with pytest.raises(AutopruneError, match="missing"):
        ModelSpec.from_dict({"name": "resnet20", "num_classes": 10})
    with pytest.raises(AutopruneError, match="num_classes"):
        ModelSpec("resnet20", 0, 3, 32)
