"""The allocator hits the MACs target on every registry model, in every mode."""
from __future__ import annotations

import pytest
import torch
from conftest import model_input

from autoprune.engine.allocate import AllocationConfig, allocate, select
from autoprune.engine.graph import build_width_cost, find_groups
from autoprune.errors import AutopruneError
from autoprune.models.registry import create_model, list_models

TARGETS = (0.7, 0.5, 0.3, 0.15)


def _setup(name):
    spec, shape = model_input(name)
    model = create_model(spec)
    groups = find_groups(model, shape, check=False)
    cost = build_width_cost(model, groups, shape)
    gen = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.channels, generator=gen) for g in groups if g.prunable}
    return groups, cost, scores


@pytest.mark.parametrize("name", list_models() + ["torchvision:resnet50"])
@pytest.mark.parametrize("mode", ["uniform", "global", "searched"])
def test_allocation_is_at_most_and_within_one_point_of_the_target(name, mode):
    groups, cost, scores = _setup(name)
    cfg = AllocationConfig(mode=mode, multipliers=(0.6, 1.0, 1.4), min_ratio=0.05)
    floor = cost.macs_fraction({g.name: max(1, -(-g.channels // 20)) for g in groups if g.prunable})
    for target in TARGETS:
        if target <= floor + 0.01:  # zero-pad ResNets keep their residual channels: 0.15 is out of reach
            with pytest.raises(AutopruneError, match="smallest reachable fraction"):
                allocate(groups, scores, cost, target, cfg)
            continue
        widths = allocate(groups, scores, cost, target, cfg)
        frac = cost.macs_fraction(widths)
        assert target - 0.01 <= frac <= target, (target, frac)
        for g in groups:
            if g.prunable:
                assert 1 <= widths[g.name] <= g.channels


def test_global_mode_keeps_more_of_the_groups_with_strong_channels():
    groups, cost, _ = _setup("resnet20")
    prunable = [g for g in groups if g.prunable]
    strong, weak = prunable[1], prunable[2]
    assert strong.channels == weak.channels
    scores = {g.name: torch.ones(g.channels) for g in prunable}
    scores[strong.name] = torch.linspace(1, 2, strong.channels)
    scores[weak.name] = torch.cat([torch.full((weak.channels // 2,), 0.01), torch.ones(weak.channels // 2)])
    widths = allocate(groups, scores, cost, 0.8, AllocationConfig(mode="global", normalise="none"))
    assert widths[weak.name] <= weak.channels // 2 < widths[strong.name]


def test_round_to_gives_multiples():
    groups, cost, scores = _setup("resnet56")
    widths = allocate(groups, scores, cost, 0.5, AllocationConfig(mode="uniform", round_to=8))
    assert all(w % 8 == 0 or w == g.channels for g in groups if g.prunable for w in [widths[g.name]])
    assert cost.macs_fraction(widths) <= 0.5


def test_unreachable_target_names_the_smallest_fraction():
    groups, cost, scores = _setup("resnet20")
    with pytest.raises(AutopruneError, match=r"smallest reachable fraction is 0\.\d+"):
        allocate(groups, scores, cost, 0.01, AllocationConfig(mode="uniform", min_ratio=0.5))


def test_bad_config_is_a_clear_error():
    with pytest.raises(AutopruneError, match="allocation mode"):
        AllocationConfig(mode="nope")
    with pytest.raises(AutopruneError, match="multipliers"):
        AllocationConfig(mode="searched")


def test_select_keeps_the_top_scores_sorted():
    keep = select({"g": torch.tensor([0.1, 0.9, 0.5, 0.7])}, {"g": 2})
    assert keep == {"g": (1, 3)}


def test_searched_residual_multiplier_spares_the_residual_stream():
    """The searched shape's separate multiplier for residual-coupled groups: > 1 keeps more of the
    residual channels (the papers prune only internal layers), < 1 keeps fewer; MACs stay on target."""
    groups, cost, scores = _setup("resnet20")
    residual = [g for g in groups if g.prunable and g.residual]
    internal = [g for g in groups if g.prunable and not g.residual]
    assert residual and internal

    def kept(widths, gs):
        return sum(widths[g.name] for g in gs) / sum(g.channels for g in gs)

    out = {}
    for r in (0.5, 1.0, 2.0):
        cfg = AllocationConfig(mode="searched", multipliers=(1.0, 1.0, 1.0), residual_multiplier=r, min_ratio=0.05)
        widths = allocate(groups, scores, cost, 0.4, cfg)
        assert 0.39 <= cost.macs_fraction(widths) <= 0.4
        out[r] = (kept(widths, residual), kept(widths, internal))
    assert out[2.0][0] > out[1.0][0] > out[0.5][0]  # residual channels kept
    assert out[2.0][1] < out[1.0][1] < out[0.5][1]  # paid for by the internal ones
    with pytest.raises(AutopruneError, match="residual_multiplier"):
        AllocationConfig(mode="searched", multipliers=(1.0,), residual_multiplier=0.0)
