"""FSM: the expected-activation formula, side-effect-free scoring, compensation, both schedules."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import randomise_bn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from autoprune.data.datasets import TensorSplit
from autoprune.engine.allocate import AllocationConfig
from autoprune.engine.graph import build_width_cost, find_groups
from autoprune.engine.plan import Plan, apply_plan, load_pruned, save_pruned
from autoprune.engine.pruning import prune
from autoprune.engine.training import run_method
from autoprune.errors import AutopruneError, SpecError
from autoprune.methods import PruneContext, get_method, list_methods, make_params
from autoprune.methods.fsm import FSM, FSMParams
from autoprune.methods.moments import clipped_normal_moments, expected_relu, gaussian_inputs, measured_inputs
from autoprune.models.registry import ModelSpec, create_model
from autoprune.train import TrainConfig, evaluate


def _context(model: nn.Module, shape, target=0.5, data=None, train_cfg=None) -> PruneContext:
    groups = find_groups(model, shape)
    return PruneContext(model=model, groups=groups, cost=build_width_cost(model, groups, shape), target=target,
                        allocation=AllocationConfig(), device=torch.device("cpu"), input_shape=shape, data=data,
                        train_cfg=train_cfg)


def _random_data(shape, n=256, seed=0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(train=TensorSplit(torch.randn(n, *shape, generator=g), torch.zeros(n, dtype=torch.long)))


# --------------------------------------------------------------------------- the formula


def test_expected_relu_matches_monte_carlo_including_negative_and_zero_gamma():
    beta = torch.tensor([0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -3.0, 0.3, -0.3, 0.7])
    gamma = torch.tensor([1.0, 0.5, 2.0, -1.0, -0.2, -3.0, 1.0, 0.0, 0.0, 1e-9])
    z = torch.randn(2_000_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = torch.relu(beta.double() + gamma.double() * z)
    mc = samples.mean(0)
    stderr = samples.std(0) / math.sqrt(z.shape[0])
    got = expected_relu(beta, gamma).double()
    assert torch.all((got - mc).abs() <= 5 * stderr + 1e-7), (got, mc)
    assert got[7] == pytest.approx(0.3) and got[8] == 0 and got[9] == pytest.approx(0.7)  # gamma ~ 0
    # the paper's closed form, written out, for a channel with negative gamma
    b, s = 0.5, 1.0
    closed = b * 0.5 * math.erfc(-b / s / math.sqrt(2)) + s * math.exp(-0.5 * (b / s) ** 2) / math.sqrt(2 * math.pi)
    assert float(got[3]) == pytest.approx(closed, rel=1e-6)


def test_clipped_moments_match_monte_carlo_for_relu6_and_second_moment():
    mean = torch.tensor([0.0, 3.0, 5.5, -1.0, 7.0])
    std = torch.tensor([2.0, -4.0, 1.0, 3.0, 0.5])
    z = torch.randn(2_000_000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = (mean.double() + std.double() * z).clamp(0, 6)
    m1, m2 = clipped_normal_moments(mean, std, 0.0, 6.0)
    assert torch.allclose(m1.double(), y.mean(0), atol=6e-3)
    assert torch.allclose(m2.double(), (y * y).mean(0), atol=3e-2)


# --------------------------------------------------------------------------- scores


def test_scoring_leaves_every_parameter_buffer_and_mode_unchanged():
    shape = (3, 16, 16)
    model = randomise_bn(create_model(ModelSpec("resnet20", 10, 3, 16)))
    with torch.no_grad():  # negative and vanishing gammas: the original clamped them in place
        model.bn1.weight[:4] = -model.bn1.weight[:4].abs()
        model.layer1[0].bn1.weight[:2] = 0.0
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    ctx = _context(model, shape, data=_random_data(shape, n=64))
    for compensation in ("gaussian", "measured"):
        scores = FSM().scores(ctx, FSMParams(compensation=compensation))
        assert set(scores) == {g.name for g in ctx.prunable}
        assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores.values())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_score_is_expected_activation_times_mean_abs_consumer_weight_sum():
    model = randomise_bn(create_model(ModelSpec("small_cnn", 10, 1, 8)))
    ctx = _context(model, (1, 8, 8))
    scores = FSM().scores(ctx, FSMParams())
    bn, consumer = model.features[1], model.features[3]  # conv -> BN -> ReLU -> conv
    e = expected_relu(bn.bias.detach(), bn.weight.detach())
    want = e * consumer.weight.detach().sum((2, 3)).abs().mean(0)
    assert torch.allclose(scores["features.0"], want, rtol=1e-5)
    # Linear after AdaptiveAvgPool2d(2) -> Flatten: channel k is read by 4 columns, shift = E_k * their sum
    bn, fc = model.features[11], model.classifier
    e = expected_relu(bn.bias.detach(), bn.weight.detach())
    want = e * fc.weight.detach().reshape(10, 64, 4).sum(2).abs().mean(0)
    assert torch.allclose(scores["features.10"], want, rtol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", pytest.param("mobilenetv2", marks=pytest.mark.slow)])
def test_propagated_expectations_match_monte_carlo_through_the_network(name):
    """Replace every BN output by N(beta, gamma^2) noise and measure what each consumer reads.

    Covers ReLU and ReLU6 after BN, depthwise passthrough, residual adds before (ResNet) and after
    (MobileNetV2) the activation, average pooling into the classifier.
    """
    shape = (3, 8, 8)
    model = randomise_bn(create_model(ModelSpec(name, 10, 3, 8)))
    groups = [g for g in find_groups(model, shape) if g.prunable]
    predicted = gaussian_inputs(model, groups, shape)
    assert not predicted.fallback

    def noise(bn, _args, out):
        return bn.bias.view(1, -1, 1, 1) + bn.weight.view(1, -1, 1, 1) * torch.randn_like(out)

    hooks = [m.register_forward_hook(noise) for m in model.modules() if isinstance(m, _BatchNorm)]
    torch.manual_seed(0)
    try:
        mc = measured_inputs(model, predicted.mean, [(torch.zeros(256, *shape), None)] * 4)
    finally:
        for h in hooks:
            h.remove()
    for g in groups:
        for c in g.consumers:
            idx = torch.tensor(g.member(c, "in").index).flatten()
            err = (predicted.mean[c][idx] - mc[c][idx]).abs().mean()
            # Monte Carlo noise (about 0.02 at the 2x2 maps) plus moment matching in ResNet's streams
            assert err < 0.04 + 0.1 * mc[c][idx].abs().mean(), (g.name, c, float(err))


# --------------------------------------------------------------------------- compensation


def gaussian_net(num_classes: int = 4, in_channels: int = 3, image_size: int = 10, bn_after: bool = False) -> nn.Module:
    """conv -> BN -> ReLU -> conv (-> BN), no padding. Also a ``module:function`` model for checkpoints."""
    layers = [nn.Conv2d(in_channels, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, num_classes, 3,
                                                                                                  bias=False)]
    return nn.Sequential(*layers, *([nn.BatchNorm2d(num_classes)] if bn_after else []))


def _gaussian_setup(bn_after: bool) -> nn.Module:
    """BN statistics match N(0, 1) inputs exactly, so BN outputs are N(beta, gamma^2): the FSM model holds."""
    g = torch.Generator().manual_seed(3)
    model = gaussian_net(bn_after=bn_after)
    with torch.no_grad():
        conv1, bn1, _, conv2 = model[:4]
        conv1.weight.copy_(torch.randn(conv1.weight.shape, generator=g) * 0.3)
        bn1.running_mean.zero_()
        bn1.running_var.copy_(conv1.weight.pow(2).sum((1, 2, 3)))
        bn1.weight.copy_(torch.randn(16, generator=g))  # some negative
        bn1.bias.copy_(torch.rand(16, generator=g) * 2 - 0.5)
        conv2.weight.copy_(torch.randn(conv2.weight.shape, generator=g) * 0.2 + 0.05)
        if bn_after:
            randomise_bn(model[4:], seed=4)
    return model.eval()


@pytest.mark.parametrize("bn_after", [False, True])
def test_compensation_removes_the_mean_shift_of_the_consumer_output(bn_after):
    shape = (3, 10, 10)
    model = _gaussian_setup(bn_after)
    x = torch.randn(2000, *shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = model(x).mean((0, 2, 3))
    shift = {}
    for compensation in ("none", "gaussian", "measured"):
        # recalibration off: it would re-estimate the BN after the consumer and hide what compensation does
        res = prune(model, "fsm", 0.5, input_shape=shape, compensation=compensation, data=_random_data(shape, 1024, 6),
                    recalibrate_batches=0)
        assert res.macs_fraction <= 0.5
        with torch.no_grad():
            shift[compensation] = float((res.model(x).mean((0, 2, 3)) - base).abs().max())
        # no BN after the consumer: a bias appears; with one: its running mean moves, no new parameter
        assert (res.model[3].bias is None) == (bn_after or compensation == "none")
    assert shift["none"] > 0.1
    assert shift["gaussian"] < 0.02 * shift["none"], shift
    assert shift["measured"] < 0.02 * shift["none"], shift


def test_compensation_bias_survives_save_and_load(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_TRUST_CODE", "test_fsm")  # the checkpoint names test_fsm:gaussian_net
    shape = (3, 10, 10)
    model = _gaussian_setup(bn_after=False)
    res = prune(model, "fsm", 0.5, input_shape=shape)
    spec = ModelSpec("test_fsm:gaussian_net", 4, 3, 10)
    save_pruned(tmp_path / "p.pt", res.model, spec, res.plan)
    loaded, _ = load_pruned(tmp_path / "p.pt")
    x = torch.randn(8, *shape)
    assert loaded[3].bias is not None
    assert torch.allclose(loaded(x), res.model(x), atol=1e-5)


# --------------------------------------------------------------------------- the method in the engine


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_fsm_prunes_cifar_models_to_the_target(name):
    shape = (3, 16, 16)
    model = randomise_bn(create_model(ModelSpec(name, 10, 3, 16)))
    res = prune(model, "fsm", 0.4, input_shape=shape)
    assert 0.39 <= res.macs_fraction <= 0.4
    assert res.info["fallback_consumers"] == []
    assert torch.isfinite(res.model(torch.randn(2, *shape))).all()


def test_layerwise_schedule_on_digits_meets_the_target_and_holds_removed_channels_at_zero(digits, digits_base):
    base, spec = digits_base
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.01)
    ctx = _context(copy.deepcopy(base), shape, target=0.4, data=digits, train_cfg=cfg)
    out = run_method(FSM(), ctx, FSMParams(schedule="layerwise")).output
    assert out.info["layerwise_steps_per_group"] >= 1
    # the removed channels carry nothing, so cutting them does not change the output
    cut = apply_plan(copy.deepcopy(out.model), ctx.groups, Plan.from_keep(out.keep, ctx.groups))
    x = next(digits.val.batches(64))[0]
    with torch.no_grad():
        assert torch.allclose(cut.eval()(x), out.model.eval()(x), atol=1e-4)
    assert ctx.cost.macs_fraction(Plan.from_keep(out.keep, ctx.groups).widths()) <= 0.4
    assert evaluate(cut, digits.val, "cpu")["acc"] > 0.8
    res = prune(base, "fsm", 0.4, data=digits, spec=spec, train_cfg=cfg, schedule="layerwise", layerwise_steps=2)
    assert 0.39 <= res.macs_fraction <= 0.4 and res.info["layerwise_steps_per_group"] == 2


# --------------------------------------------------------------------------- parameters and errors


def test_fsm_is_registered_with_validated_params_and_budget_share():
    assert "fsm" in list_methods()
    method = get_method("fsm")
    assert make_params(method, {"compensation": "measured", "calibration_batches": "4"}).calibration_batches == 4
    assert make_params(method, {"compensation": "gaussian", "calibration_batches": 4}).batches == 4
    assert make_params(method, {}).batches == 8
    with pytest.raises(SpecError, match="calibration_batches is read only"):
        make_params(method, {"compensation": "none", "calibration_batches": 4})
    with pytest.raises(SpecError, match="compensation"):
        make_params(method, {"compensation": "bogus"})
    with pytest.raises(SpecError, match="schedule"):
        make_params(method, {"schedule": "greedy"})
    assert method.training_epochs(FSMParams(), 30) == 0
    assert method.training_epochs(FSMParams(schedule="layerwise"), 30) == 10


def test_measured_and_layerwise_without_data_are_clear_errors():
    model = create_model(ModelSpec("small_cnn", 10, 1, 8)).eval()
    with pytest.raises(AutopruneError, match="data="):
        prune(model, "fsm", 0.5, input_shape=(1, 8, 8), compensation="measured")
    with pytest.raises(AutopruneError, match="data="):
        prune(model, "fsm", 0.5, input_shape=(1, 8, 8), schedule="layerwise")


# --------------------------------------------------------------------------- networks without BN


def _no_bn_net(digits) -> nn.Module:
    """small_cnn's layout without BN (biased convs and ReLUs), trained on digits (about 98.6 % val)."""
    from autoprune.models.zoo import kaiming_init
    from autoprune.train import fit

    torch.manual_seed(0)

    def conv(i: int, o: int) -> nn.Conv2d:
        return nn.Conv2d(i, o, 3, padding=1)

    net = nn.Sequential(conv(1, 16), nn.ReLU(), conv(16, 32), nn.ReLU(), nn.MaxPool2d(2), conv(32, 64), nn.ReLU(),
                        conv(64, 64), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 10))
    kaiming_init(net)
    fit(net, digits.train, None, TrainConfig(epochs=15, lr=0.05, seed=0, batch_size=32, warmup_epochs=1), "cpu")
    return net.eval()


def test_gaussian_without_bn_uses_calibration_means_and_without_data_does_not_compensate(digits):
    """The BN model needs a BN: on a network without one, 'gaussian' measures the consumer inputs on
    calibration batches (the same as 'measured' there) instead of compensating with a placeholder;
    without data it leaves those consumers uncompensated."""
    net = _no_bn_net(digits)
    shape = (1, 8, 8)
    gauss = prune(net, "fsm", 0.3, data=digits, input_shape=shape, compensation="gaussian", calibration_batches=4)
    measured = prune(net, "fsm", 0.3, data=digits, input_shape=shape, compensation="measured", calibration_batches=4)
    none = prune(net, "fsm", 0.3, data=digits, input_shape=shape, compensation="none")
    consumers = {"2", "5", "7", "11"}
    assert set(gauss.info["measured_consumers"]) == consumers and not gauss.info["uncompensated_consumers"]
    assert gauss.plan.keep == measured.plan.keep
    for (k, a), b in zip(gauss.model.state_dict().items(), measured.model.state_dict().values()):
        assert torch.equal(a, b), k
    acc = {name: evaluate(r.model, digits.val, "cpu")["acc"] for name, r in
           (("gaussian", gauss), ("none", none))}
    assert acc["gaussian"] > acc["none"] + 0.05  # measured 0.947 vs 0.786, before any fine-tuning
    blind = prune(net, "fsm", 0.3, input_shape=shape, compensation="gaussian")
    assert set(blind.info["uncompensated_consumers"]) == consumers
    for (k, a), b in zip(blind.model.state_dict().items(), prune(net, "fsm", 0.3, input_shape=shape,
                                                                  compensation="none").model.state_dict().values()):
        assert torch.equal(a, b), k  # nothing put back from a placeholder mean
