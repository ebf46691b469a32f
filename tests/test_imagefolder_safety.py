"""Image folders (issue 30, item 5): symlinks are followed at most once, so a loop neither multiplies
the data nor puts one image in train and val; a dangling symlink and an unreadable image are one line
that names the file; a folder without links lists its images in torchvision's order."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from test_faults import one_line

from autoprune.cli import main
from autoprune.data.datasets import DataSpec, load_data
from autoprune.errors import AutopruneError


def make_folder(root: Path, per_class: int = 10) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def load(root: Path):
    return load_data(DataSpec(f"imagefolder:{root}", image_size=8, val_fraction=0.2, test_fraction=0.2))


def test_symlink_loops_do_not_multiply_the_data(tmp_path):
    root = make_folder(tmp_path / "imgs")
    os.symlink("..", root / "a" / "up")  # a/up -> the root: every class again, forever
    os.symlink(".", root / "a" / "self")
    os.symlink(str(root / "b"), root / "a" / "b_again")  # a second link to b's images
    ds = load(root)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 20  # each image once
    files = [os.path.realpath(p) for p, _ in ds.train.dataset.dataset.samples]
    assert len(files) == len(set(files)) == 20


def test_a_folder_without_links_keeps_torchvisions_order(tmp_path):
    from torchvision.datasets import ImageFolder

    root = make_folder(tmp_path / "imgs", per_class=6)
    (root / "a" / "sub").mkdir()
    (root / "a" / "0.png").rename(root / "a" / "sub" / "z.png")
    ours = load(root).train.dataset.dataset.samples
    assert ours == ImageFolder(str(root)).samples


def test_a_dangling_symlink_is_one_line_naming_it(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs")
    os.symlink(str(tmp_path / "gone.png"), root / "b" / "broken.png")
    with pytest.raises(AutopruneError, match="broken.png is a dangling symlink"):
        load(root)
    assert main(["info", "--model", "small_cnn", "--data", f"imagefolder:{root}"]) == 2
    one_line(capsys, "broken.png", "dangling symlink", "remove it")


def test_an_unreadable_image_is_one_line_naming_it(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", per_class=12)
    for i in range(12):  # enough broken files that the statistics sample or a batch meets one
        (root / "a" / f"{i}.png").write_bytes(b"not a png")
    assert main(["train", "--model", "small_cnn", "--data", f"imagefolder:{root}", "--epochs", "1",
                 "--out", str(tmp_path / "m.pt")]) == 2
    err = one_line(capsys, "cannot be read", "remove or replace it")
    assert f"{root / 'a'}" in err and not (tmp_path / "m.pt").exists()


def test_an_unreadable_image_met_by_a_dataloader_worker_is_one_line(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=12)
    ds = load(root)
    bad = ds.val.dataset.dataset.samples[ds.val.dataset.indices[0]][0]
    Path(bad).write_bytes(b"\x89PNG truncated")
    with pytest.raises(AutopruneError) as info:
        list(ds.val.batches(4))
    assert "\n" not in str(info.value) and bad in str(info.value) and "cannot be read" in str(info.value)
