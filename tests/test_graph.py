"""Channel groups and surgery on every registry model plus torchvision's common architectures."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import TORCHVISION_MODELS, model_input, randomise_bn
from torch.utils.flop_counter import FlopCounterMode

from autoprune.engine.cost import count_macs, count_params
from autoprune.engine.graph import build_width_cost, find_groups, remove_channels
from autoprune.models.registry import ModelSpec, create_model, list_models


@pytest.mark.parametrize("name", list_models() + TORCHVISION_MODELS)
def test_removing_30_percent_of_every_group_runs_with_fewer_macs_and_analytic_count(name):
    spec, shape = model_input(name)
    model = create_model(spec).eval()
    groups = find_groups(model, shape)
    prunable = [g for g in groups if g.prunable]
    assert prunable, f"{name}: no prunable group"
    keep = {g.name: range(int(0.3 * g.channels), g.channels) for g in prunable}
    pruned = copy.deepcopy(model)
    remove_channels(pruned, groups, keep)
    out = pruned(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    cost = build_width_cost(model, groups, shape)
    widths = {g.name: len(keep[g.name]) for g in prunable}
    measured = count_macs(pruned, shape)
    assert measured < count_macs(model, shape)
    assert cost.macs(widths) == measured
    assert cost.params(widths) == count_params(pruned)


def test_classifier_output_is_never_in_a_group():
    spec, shape = model_input("resnet20")
    model = create_model(spec)
    groups = find_groups(model, shape)
    assert not any(m.module == "fc" and m.dim == "out" for g in groups for m in g.members)


def test_zero_pad_shortcut_groups_are_unprunable_with_a_reason():
    spec, shape = model_input("resnet56_a")
    groups = find_groups(create_model(spec), shape)
    bad = [g for g in groups if not g.prunable]
    assert len(bad) == 1 and "ConstantPadNd" in bad[0].reason
    assert bad[0].residual  # the stem and every stage's residual channels, coupled through padding
    assert all(not g.residual for g in groups if g.prunable)  # what remains: the blocks' internal convs


def test_resnet18_macs_match_flop_counter():
    model = create_model(ModelSpec("torchvision:resnet18", 1000, 3, 224)).eval()
    macs = count_macs(model, (3, 224, 224))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224))
    flops = counter.get_total_flops()
    assert abs(macs / 1e9 - 1.82) < 0.01 * 1.82  # the published 1.82 GMACs
    assert abs(macs - flops / 2) <= 0.01 * macs


def _zero_consumer_inputs(model, group, dropped):
    """Zero every weight slice that reads the dropped channels: the same as zero activations."""
    for member in group.members:
        if member.dim != "in":
            continue
        weight = model.get_submodule(member.module).weight
        cols = [i for c in dropped for i in member.index[c]]
        weight.data[:, cols] = 0


@pytest.mark.parametrize("name", ["resnet56", "mobilenetv2", "torchvision:mobilenet_v2"])
def test_removal_equals_zeroed_activations_at_the_consumers(name):
    spec, shape = model_input(name)
    model = randomise_bn(create_model(spec))
    groups = [g for g in find_groups(model, shape) if g.prunable and not g.residual]
    assert len(groups) >= 3
    gen = torch.Generator().manual_seed(1)
    keep, zeroed = {}, copy.deepcopy(model)
    for g in groups[:: max(1, len(groups) // 6)]:
        perm = torch.randperm(g.channels, generator=gen).tolist()
        kept = sorted(perm[: g.channels // 2])
        keep[g.name] = kept
        # a depthwise conv between leader and consumer passes the zero through unchanged only if
        # its BN adds nothing: zero the consumers' reading slices, which is what surgery removes
        _zero_consumer_inputs(zeroed, g, sorted(set(range(g.channels)) - set(kept)))
    pruned = copy.deepcopy(model)
    remove_channels(pruned, groups, keep)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-4, atol=1e-5)


def test_bad_keep_sets_are_clear_errors():
    from autoprune.errors import AutopruneError

    spec, shape = model_input("resnet20")
    model = create_model(spec)
    groups = find_groups(model, shape)
    g = next(g for g in groups if g.prunable)
    with pytest.raises(AutopruneError, match="no channels"):
        remove_channels(model, groups, {g.name: []})
    with pytest.raises(AutopruneError, match="out of range"):
        remove_channels(model, groups, {g.name: [g.channels]})
    with pytest.raises(AutopruneError, match="does not exist"):
        remove_channels(model, groups, {"nope": [0]})


def test_groups_can_be_found_inside_no_grad():
    spec, shape = model_input("resnet20")
    with torch.no_grad():
        groups = find_groups(create_model(spec), shape)
    assert any(g.prunable for g in groups)
