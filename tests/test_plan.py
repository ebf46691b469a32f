"""Plans, safe save/load of pruned models, and the prune() front door."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import model_input, randomise_bn

import autoprune
from autoprune.engine.plan import Plan, apply_plan, load_pruned, read_checkpoint, save_pruned
from autoprune.errors import AutopruneError, CheckpointError
from autoprune.models.registry import create_model


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "small_cnn"])
def test_pruned_model_reloads_in_a_fresh_process_bit_for_bit(name, tmp_path):
    spec, shape = model_input(name)
    model = randomise_bn(create_model(spec))
    result = autoprune.prune(model, "l1", 0.5, spec=spec)
    path = tmp_path / "pruned.pt"
    save_pruned(path, result.model, spec, result.plan)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = result.model(x)
    code = (
        "import torch, autoprune, sys\n"
        # the same intra-op threads as this process: a depthwise conv's reduction order follows them
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        f"m, _ = autoprune.load_pruned({str(path)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        "with torch.no_grad(): torch.save(m(x), sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "y.pt")], check=True)
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert torch.equal(got, expected)
    ckpt = torch.load(path, weights_only=True)  # a plain safe load works too: no pickled modules
    assert ckpt["format"] == "autoprune.pruned/1"


def test_prune_meets_target_and_leaves_the_input_model_alone():
    spec, _ = model_input("resnet56")
    model = create_model(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = autoprune.prune(model, "l1", 0.4, spec=spec)
    assert 0.39 <= result.macs_fraction <= 0.4
    assert result.params < result.base_params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_json_round_trip_and_mismatch_errors():
    spec, _ = model_input("resnet20")
    result = autoprune.prune(create_model(spec), "l1", 0.5, spec=spec)
    plan = Plan.from_dict(json.loads(json.dumps(result.plan.to_dict())))
    assert plan == result.plan
    other_spec, other_shape = model_input("resnet56")
    other = create_model(other_spec)
    from autoprune.engine.graph import find_groups

    bad = Plan(keep={"layer9.conv": (0,)}, channels={"layer9.conv": 16})
    with pytest.raises(AutopruneError, match="another architecture"):
        apply_plan(other, find_groups(other, other_shape), bad)


def test_missing_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_pruned(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not an autoprune checkpoint"):
        load_pruned(foreign)


def test_unknown_method_and_parameter_are_clear_errors():
    spec, _ = model_input("small_cnn")
    model = create_model(spec)
    with pytest.raises(AutopruneError, match="unknown pruning method 'l2'"):
        autoprune.prune(model, "l2", 0.5, spec=spec)
    with pytest.raises(AutopruneError, match="has no parameter 'alpha'"):
        autoprune.prune(model, "l1", 0.5, spec=spec, alpha=1)
