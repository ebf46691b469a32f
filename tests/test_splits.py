"""One data split everywhere: the split seed is not the training seed, checkpoints record the split's
hash, and a base made on another split than the search's is an error naming both."""
from __future__ import annotations

import pytest
import yaml

from autoprune.cli import main
from autoprune.data.datasets import DataSpec, load_data
from autoprune.data.splits import check_split
from autoprune.engine.plan import read_checkpoint
from autoprune.errors import AutopruneError
from autoprune.search.runner import run_search
from autoprune.search.spec import load_spec


def test_training_seed_does_not_move_the_split(tmp_path):
    for seed in (0, 1):
        assert main(["train", "--model", "small_cnn", "--data", "digits", "--epochs", "1", "--seed", str(seed),
                     "--out", str(tmp_path / f"s{seed}" / "base.pt"), "--device", "cpu"]) == 0
    a, b = (read_checkpoint(tmp_path / f"s{s}" / "base.pt") for s in (0, 1))
    assert a["split_hash"] == b["split_hash"] == load_data(DataSpec("digits")).split_hash
    assert a["data"] == b["data"] and a["data"]["seed"] == 0  # was: --seed 1 moved 214 of 359 test images
    assert main(["train", "--model", "small_cnn", "--data", "digits", "--epochs", "1", "--split-seed", "1",
                 "--out", str(tmp_path / "other.pt"), "--device", "cpu"]) == 0
    assert read_checkpoint(tmp_path / "other.pt")["split_hash"] != a["split_hash"]


def test_split_hash_is_a_fingerprint_of_the_indices():
    a, b, c = (load_data(DataSpec("digits", seed=s)) for s in (0, 0, 1))
    assert a.split_hash == b.split_hash != c.split_hash
    assert len(a.split_hash) == 16
    frac = load_data(DataSpec("digits", val_fraction=0.25))
    assert frac.split_hash != a.split_hash


@pytest.fixture(scope="module")
def other_split_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("other") / "base.pt"
    assert main(["train", "--model", "small_cnn", "--data", "digits", "--epochs", "1", "--split-seed", "1",
                 "--out", str(path), "--device", "cpu"]) == 0
    return path


def _spec(folder, base) -> object:
    spec = {"study": "t", "model": "small_cnn", "data": {"name": "digits", "seed": 0}, "base": str(base),
            "device": "cpu", "seed": 0, "budget": {"max_trials": 1}, "early_stop": {"enabled": False},
            "space": {"method": "l1", "target": 0.5, "allocation": "global", "epochs": 1, "lr": 0.01}}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path)


def test_search_on_another_split_than_the_base_is_an_error_naming_both(other_split_base, tmp_path):
    here = load_data(DataSpec("digits", seed=0)).split_hash
    there = read_checkpoint(other_split_base)["split_hash"]
    with pytest.raises(AutopruneError) as info:
        run_search(_spec(tmp_path, other_split_base), tmp_path / "out", progress=False)
    message = str(info.value)
    assert here in message and there in message and "seed=1" in message and "seed=0" in message
    assert "--allow-split-mismatch" in message and "\n" not in message
    assert not (tmp_path / "out" / "trials.csv").exists()  # refused before any trial


def test_explicit_override_restamps_the_base_and_the_search_runs(other_split_base, tmp_path, capsys):
    restamped = tmp_path / "restamped.pt"
    assert main(["import", "--checkpoint", str(other_split_base), "--data", "digits", "--out", str(restamped),
                 "--device", "cpu"]) == 2  # without the override: the same error, one line
    assert "split" in capsys.readouterr().err
    assert main(["import", "--checkpoint", str(other_split_base), "--data", "digits", "--allow-split-mismatch",
                 "--out", str(restamped), "--device", "cpu"]) == 0
    ckpt = read_checkpoint(restamped)
    assert ckpt["split_hash"] == load_data(DataSpec("digits")).split_hash
    assert ckpt["metrics"]["imported"]["split_mismatch_allowed"] is True
    result = run_search(_spec(tmp_path, restamped), tmp_path / "out", progress=False)
    assert result is not None and (tmp_path / "out" / "trials.csv").exists()


def test_checkpoints_without_a_hash_are_compared_by_their_data_spec():
    data = load_data(DataSpec("digits", seed=0))
    check_split({"data": DataSpec("digits", seed=0).to_dict()}, data, "old.pt")  # same spec: fine
    check_split({}, data, "unknown.pt")  # nothing recorded: nothing to compare
    with pytest.raises(AutopruneError, match="old.pt was made on the data split name='digits', seed=1"):
        check_split({"data": DataSpec("digits", seed=1).to_dict()}, data, "old.pt")
    check_split({"data": DataSpec("digits", seed=1).to_dict()}, data, "old.pt", allow_mismatch=True)
