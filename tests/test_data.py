"""Data sets and splits: shapes, deterministic disjoint splits, train-only standardisation,
npz/imagefolder loading and their errors, batching and augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from autoprune.data.datasets import (
    DataSpec,
    TensorSplit,
    augment_batch,
    list_datasets,
    load_data,
    split_indices,
)
from autoprune.errors import AutopruneError


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec("digits", seed=0))


def _indices(split) -> set[int]:
    return set(split.indices.tolist())


def test_digits_shapes_and_split_sizes(digits):
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert (len(digits.val), len(digits.test)) == (359, 359)  # round(0.2 * 1797)
    for split in (digits.train, digits.val, digits.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (1, 8, 8)
        assert split.y.dtype == torch.long and len(split.y) == len(split)
        assert set(split.y.unique().tolist()) == set(range(10))


def test_digits_splits_are_disjoint_and_cover_the_data(digits):
    train, val, test = _indices(digits.train), _indices(digits.val), _indices(digits.test)
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(range(1797))


def test_split_indices_point_at_the_right_rows_and_stats_come_from_train(digits):
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images, dtype=torch.float32).div(16).unsqueeze(1)
    labels = torch.tensor(load_digits().target)
    train_idx = digits.train.indices
    mean, std = raw[train_idx].mean().item(), raw[train_idx].std().item()
    assert digits.mean == pytest.approx((mean,), rel=1e-4) and digits.std == pytest.approx((std,), rel=1e-4)
    for split in (digits.train, digits.val, digits.test):
        assert torch.allclose(split.x, (raw[split.indices] - mean) / std, atol=1e-5)
        assert torch.equal(split.y, labels[split.indices])
    assert abs(digits.train.x.mean().item()) < 1e-4
    assert digits.train.x.std().item() == pytest.approx(1.0, abs=1e-3)
    # statistics of all 1797 images differ from the train-only ones, so this test can tell them apart
    assert raw.mean().item() != pytest.approx(mean, abs=1e-6)


def test_digits_splits_are_stratified(digits):
    counts = torch.bincount(digits.test.y, minlength=10).float()
    overall = torch.bincount(torch.cat([digits.train.y, digits.val.y, digits.test.y]), minlength=10).float()
    expected = overall * len(digits.test) / 1797
    assert (counts - expected).abs().max() <= 2


def test_digits_deterministic_per_seed_and_different_across_seeds(digits):
    again = load_data(DataSpec("digits", seed=0))
    other = load_data(DataSpec("digits", seed=1))
    assert torch.equal(again.train.indices, digits.train.indices)
    assert torch.equal(again.test.x, digits.test.x)
    assert not torch.equal(other.test.indices, digits.test.indices)
    assert len(_indices(other.test) ^ _indices(digits.test)) > 100


def test_split_fractions_are_respected():
    y = np.arange(100) % 3
    train, val, test = split_indices(y, seed=5, val_fraction=0.1, test_fraction=0.3)
    assert (len(train), len(val), len(test)) == (60, 10, 30)
    assert len(set(train) | set(val) | set(test)) == 100
    train0, val0, _ = split_indices(y, seed=5, val_fraction=0.0, test_fraction=0.3)
    assert len(val0) == 0 and len(train0) == 70


def test_npz_round_trip_nhw_uint8(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 6, 6), dtype=np.uint8)
    y = np.arange(50) % 5
    path = tmp_path / "gray.npz"
    np.savez(path, x=x, y=y)
    ds = load_data(DataSpec(f"npz:{path}", seed=3))
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (5, 1, 6)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 50
    scaled = torch.from_numpy(x).float().div(255).unsqueeze(1)
    mean, std = scaled[ds.train.indices].mean(), scaled[ds.train.indices].std()
    for split in (ds.train, ds.val, ds.test):
        assert torch.allclose(split.x, (scaled[split.indices] - mean) / std, atol=1e-5)
        assert torch.equal(split.y, torch.from_numpy(y)[split.indices])


def test_npz_round_trip_nchw_float_and_channels_last(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3, 5, 5)).astype(np.float32)
    y = np.arange(40) % 4
    np.savez(tmp_path / "nchw.npz", x=x, y=y)
    np.savez(tmp_path / "nhwc.npz", x=np.transpose(x, (0, 2, 3, 1)), y=y)
    a = load_data(DataSpec(f"npz:{tmp_path / 'nchw.npz'}"))
    b = load_data(DataSpec(f"npz:{tmp_path / 'nhwc.npz'}"))
    assert (a.num_classes, a.in_channels, a.image_size) == (4, 3, 5)
    assert torch.equal(a.train.x, b.train.x)
    train = torch.from_numpy(x)[a.train.indices]
    mean = train.mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(a.mean), mean, atol=1e-5)
    assert torch.allclose(a.train.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_npz_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(AutopruneError, match="nope.npz.*not found"):
        load_data(DataSpec(f"npz:{missing}"))
    no_y = tmp_path / "no_y.npz"
    np.savez(no_y, x=np.zeros((4, 3, 3)), labels=np.zeros(4))
    with pytest.raises(AutopruneError) as info:
        load_data(DataSpec(f"npz:{no_y}"))
    assert str(no_y) in str(info.value) and "'y'" in str(info.value)
    bad_shape = tmp_path / "bad_shape.npz"
    np.savez(bad_shape, x=np.zeros((4, 3)), y=np.zeros(4, dtype=int))
    with pytest.raises(AutopruneError, match="bad_shape.npz.*shape"):
        load_data(DataSpec(f"npz:{bad_shape}"))
    bad_y = tmp_path / "bad_y.npz"
    np.savez(bad_y, x=np.zeros((4, 3, 3)), y=np.zeros(5, dtype=int))
    with pytest.raises(AutopruneError, match="bad_y.npz.*one label per image"):
        load_data(DataSpec(f"npz:{bad_y}"))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file")
    with pytest.raises(AutopruneError, match="corrupt.npz"):
        load_data(DataSpec(f"npz:{corrupt}"))


def test_unknown_data_set_lists_known_ones():
    with pytest.raises(AutopruneError) as info:
        load_data(DataSpec("digitz"))
    msg = str(info.value)
    assert "did you mean 'digits'" in msg
    for name in list_datasets():
        assert name in msg


def test_list_datasets():
    assert list_datasets() == ["digits", "synthetic", "npz:<path>", "imagefolder:<dir>",
                               "cifar10", "cifar100", "mnist", "fashionmnist"]


def test_torchvision_set_offline_raises_with_the_fix(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(AutopruneError) as info:
        load_data(DataSpec("cifar10", root=str(tmp_path)))
    msg = str(info.value)
    assert "could not be downloaded" in msg and str(tmp_path) in msg and "npz:" in msg


def test_batches_cover_every_sample_once_per_epoch_with_shuffle():
    n = 103
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    split = TensorSplit(x, torch.arange(n))
    gen = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):
        batches = list(split.batches(10, shuffle=True, generator=gen))
        assert [len(yb) for _, yb in batches] == [10] * 10 + [3]
        ys = torch.cat([yb for _, yb in batches])
        xs = torch.cat([xb[:, 0, 0, 0] for xb, _ in batches]).long()
        assert sorted(ys.tolist()) == list(range(n))
        assert torch.equal(xs, ys)  # x and y stay paired
        orders.append(ys)
    assert not torch.equal(orders[0], torch.arange(n))  # actually shuffled
    assert not torch.equal(orders[0], orders[1])  # a new order each epoch
    replay = torch.cat([yb for _, yb in split.batches(10, True, torch.Generator().manual_seed(0))])
    assert torch.equal(replay, orders[0])  # same generator seed, same order
    plain = torch.cat([yb for _, yb in split.batches(32)])
    assert torch.equal(plain, torch.arange(n))


def test_uint8_split_is_scaled_and_standardised_per_batch():
    x = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 2.0])
    split = TensorSplit(x, torch.zeros(6), mean, std)
    xb, yb = next(split.batches(6))
    assert xb.dtype == torch.float32 and yb.dtype == torch.long
    assert torch.allclose(xb, (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    assert len(split.to("cpu")) == 6


def _matches_a_shift(out: torch.Tensor, img: torch.Tensor, pad: int, allow_flip: bool) -> bool:
    h, w = img.shape[-2:]
    candidates = [img, img.flip(-1)] if allow_flip else [img]
    for cand in candidates:
        padded = torch.nn.functional.pad(cand, (pad, pad, pad, pad))
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if torch.equal(out, padded[:, dy:dy + h, dx:dx + w]):
                    return True
    return False


def test_augment_crops_and_flips_only_large_images():
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(64, 1, 8, 8)
    out = augment_batch(small, gen)
    assert out.shape == small.shape
    assert all(_matches_a_shift(o, i, pad=1, allow_flip=False) for o, i in zip(out, small))
    assert not torch.equal(out, small)
    large = torch.randn(64, 3, 32, 32)
    out = augment_batch(large, gen)
    assert all(_matches_a_shift(o, i, pad=4, allow_flip=True) for o, i in zip(out, large))
    flipped = sum(not _matches_a_shift(o, i, pad=4, allow_flip=False) for o, i in zip(out, large, strict=True))
    assert 10 < flipped < 54  # about half are mirrored


def test_synthetic_is_deterministic_per_seed():
    a = load_data(DataSpec("synthetic", seed=0))
    b = load_data(DataSpec("synthetic", seed=0))
    c = load_data(DataSpec("synthetic", seed=1))
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 3, 32)
    assert len(a.train) + len(a.val) + len(a.test) == 2000
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    assert torch.bincount(a.train.y).tolist() == [len(a.train) // 10] * 10
    small = load_data(DataSpec("synthetic", image_size=16))
    assert small.train.x.shape[1:] == (3, 16, 16)


def test_synthetic_classes_are_separable_by_their_means():
    # a nearest-class-mean classifier (fit on train) is far above chance on val: the data is learnable
    ds = load_data(DataSpec("synthetic", seed=0))
    centroids = torch.stack([ds.train.x[ds.train.y == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(ds.val.x.flatten(1), centroids).argmin(1)
    assert (pred == ds.val.y).float().mean().item() > 0.5  # chance is 0.1


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            arr = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    ds = load_data(DataSpec(f"imagefolder:{tmp_path}", image_size=8, val_fraction=0.2, test_fraction=0.2))
    assert (ds.num_classes, ds.in_channels, ds.image_size, ds.classes) == (2, 3, 8, ("cat", "dog"))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 4, 4)
    ys = []
    for xb, yb in ds.train.batches(5, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert xb.shape[1:] == (3, 8, 8) and xb.dtype == torch.float32
        ys.append(yb)
    assert sorted(torch.cat(ys).tolist()) == [0] * 6 + [1] * 6
    with pytest.raises(AutopruneError, match="not_there"):
        load_data(DataSpec(f"imagefolder:{tmp_path / 'not_there'}"))


def test_data_spec_round_trip_and_validation():
    spec = DataSpec("digits", seed=3, val_fraction=0.1, test_fraction=0.3, image_size=None, root=None)
    assert DataSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(AutopruneError, match="val_fraction"):
        DataSpec("digits", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(AutopruneError, match="unknown keys"):
        DataSpec.from_dict({"name": "digits", "sed": 1})

