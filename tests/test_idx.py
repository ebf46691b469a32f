"""MNIST-style idx files: read offline from a root, the Debian folder or the cache; clear errors."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from autoprune.data import datasets as data_mod
from autoprune.data.datasets import DataSpec, idx, load_data
from autoprune.errors import AutopruneError


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    body = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(body)
    else:
        path.write_bytes(body)


def _fake_set(folder, n_train=60, n_test=20, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28)), "train_y": np.arange(n_train) % 10,
              "test_x": rng.integers(0, 256, (n_test, 28, 28)), "test_y": (np.arange(n_test) + 3) % 10}
    for key, stem in idx.FILES.items():
        _write_idx(folder / stem, arrays[key], compress)
    return arrays


@pytest.fixture
def no_system_copies(monkeypatch, tmp_path):
    """No Debian folder, an empty cache, and no network: only what a test writes exists."""
    monkeypatch.setitem(idx.SETS, "fashionmnist", ("FashionMNIST", str(tmp_path / "no_debian"),
                                                   "dataset-fashion-mnist"))
    monkeypatch.setattr(data_mod, "DEFAULT_ROOT", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    return tmp_path


@pytest.mark.parametrize("compress", [True, False])
def test_reads_a_root_and_keeps_the_official_test_split(no_system_copies, compress):
    root = no_system_copies / "fm"
    arrays = _fake_set(root, compress=compress)
    ds = load_data(DataSpec("fashionmnist", seed=0, val_fraction=0.2, root=str(root)))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (48, 12, 20)
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10
    assert (ds.in_channels, ds.image_size) == (1, 28)
    assert torch.equal(ds.test.y.cpu(), torch.from_numpy(arrays["test_y"]))  # official order, untouched
    assert torch.equal(ds.test.x[:, 0].cpu(), torch.from_numpy(arrays["test_x"].astype(np.uint8)))
    # train and val are disjoint rows of the 60 training images
    tr, va = set(ds.train.indices.tolist()), set(ds.val.indices.tolist())
    assert not tr & va and len(tr | va) == 60


def test_torchvision_layout_in_the_cache_is_found(no_system_copies):
    _fake_set(no_system_copies / "cache" / "FashionMNIST" / "raw", compress=False)
    assert len(load_data(DataSpec("fashionmnist")).test) == 20


def test_missing_everywhere_offline_names_the_package_and_download(no_system_copies):
    with pytest.raises(AutopruneError) as err:
        load_data(DataSpec("fashionmnist"))
    msg = str(err.value)
    assert "\n" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download" in msg


def test_truncated_file_is_a_clear_error(no_system_copies):
    root = no_system_copies / "fm"
    _fake_set(root, compress=False)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AutopruneError, match="truncated or corrupt"):
        load_data(DataSpec("fashionmnist", root=str(root)))


def test_read_idx_rejects_non_idx(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(AutopruneError, match="no idx header"):
        idx.read_idx(p)


def test_corrupt_gzip_and_labels_out_of_range_are_clear_errors(no_system_copies):
    root = no_system_copies / "fm"
    _fake_set(root)
    labels = root / "train-labels-idx1-ubyte.gz"
    raw = labels.read_bytes()
    labels.write_bytes(raw[:20] + bytes(len(raw) - 20))  # deflate stream destroyed after the gzip header
    with pytest.raises(AutopruneError, match="could not be read"):
        load_data(DataSpec("fashionmnist", root=str(root)))
    _write_idx(root / "train-labels-idx1-ubyte", np.full(60, 200), compress=True)
    with pytest.raises(AutopruneError, match="0..9"):
        load_data(DataSpec("fashionmnist", root=str(root)))
