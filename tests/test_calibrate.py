"""Adaptive BN recalibration: exact statistics, nothing else touched, wired into the engine."""
from __future__ import annotations

import torch
from conftest import TensorSplit
from torch import nn

from autoprune.data.datasets import DataSpec, load_data
from autoprune.engine import pruning as engine
from autoprune.engine.calibrate import recalibrate_bn, restat_bn
from autoprune.models.registry import ModelSpec, create_model
from autoprune.train import evaluate


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_statistics_are_the_exact_batch_average_and_weights_are_untouched():
    model = _net().eval()
    x = torch.randn(96, 1, 8, 8) * 3 + 1
    split = TensorSplit(x, torch.zeros(96, dtype=torch.long))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    seen = recalibrate_bn(model, split, batches=3, batch_size=32, seed=0)
    assert seen == 96
    # the whole split was seen (3 batches of 32): BN1's input statistics are those of conv1(x)
    with torch.no_grad():
        h = model[0](x)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    # per-batch unbiased variances averaged: close to the whole-set variance, far from the reset value 1
    assert torch.allclose(bn.running_var, h.var(dim=(0, 2, 3)), rtol=0.15)
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var), rtol=0.05)
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    assert not model.training and all(not m.training for m in model.modules())
    assert bn.momentum == 0.1


def test_dropout_stays_off_and_batches_are_limited():
    model = _net().eval()
    split = TensorSplit(torch.randn(640, 1, 8, 8), torch.zeros(640, dtype=torch.long))
    calls = []
    model[3].register_forward_hook(lambda m, i, o: calls.append(m.training))
    assert recalibrate_bn(model, split, batches=2, batch_size=64) == 128
    assert calls == [False, False]


def test_no_bn_or_zero_batches_is_a_no_op():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    split = TensorSplit(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))
    assert recalibrate_bn(model, split, batches=4) == 0
    assert recalibrate_bn(_net(), split, batches=0) == 0


def test_engine_recalibrates_after_surgery_by_default():
    data = load_data(DataSpec("digits", seed=0))
    spec = ModelSpec("small_cnn", 10, 1, 8)
    torch.manual_seed(0)
    model = create_model(spec).eval()
    stale = engine.prune(model, "l1", 0.5, data=data, spec=spec, recalibrate_batches=0)
    fresh = engine.prune(model, "l1", 0.5, data=data, spec=spec)
    assert stale.info["bn_recalibration_images"] == 0
    assert fresh.info["bn_recalibration_images"] > 0
    assert stale.plan == fresh.plan  # the same channels: only statistics differ
    bn_stale = [m for m in stale.model.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_fresh = [m for m in fresh.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(not torch.allclose(a.running_mean, b.running_mean) for a, b in zip(bn_stale, bn_fresh))
    evaluate(fresh.model, data.val, "cpu")  # still a working model


def test_no_usable_batch_leaves_the_statistics_as_they_were():
    model = _net().eval()
    model[1].running_mean.fill_(0.5)
    split = TensorSplit(torch.randn(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))  # one image: no variance
    assert recalibrate_bn(model, split, batches=4) == 0
    assert torch.all(model[1].running_mean == 0.5)


def test_restat_keeps_the_eval_function_and_makes_a_later_recalibration_a_no_op():
    """A BN whose running statistics are not its input's (as after a fold): recalibrating it changes
    what the model computes; restat_bn measures the statistics and moves the difference into the
    affine, so the function stays and a recalibration afterwards changes (almost) nothing."""
    model = _net().eval()
    x = torch.randn(128, 1, 8, 8) * 2 + 0.5
    split = TensorSplit(x, torch.zeros(128, dtype=torch.long))
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 3)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        before = model(x)
    plain = _net().eval()
    plain.load_state_dict(model.state_dict())
    recalibrate_bn(plain, split, batches=4, batch_size=32)
    with torch.no_grad():
        assert (plain(x) - before).norm() / before.norm() > 0.1  # the stale statistics mattered

    assert restat_bn(model, [model[1], model[5]], split, batches=4, batch_size=32) == 128
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
        h = model[0](x)
    torch.testing.assert_close(model[1].running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    recalibrate_bn(model, split, batches=4, batch_size=32)
    with torch.no_grad():
        assert (model(x) - before).norm() / before.norm() < 0.02
    assert restat_bn(model, [], split) == 0 and restat_bn(model, [model[1]], split, batches=0) == 0
    one = TensorSplit(x[:1], torch.zeros(1, dtype=torch.long))  # a variance needs two samples: nothing measured
    assert restat_bn(model, [model[1]], one, batches=2, batch_size=1) == 0
