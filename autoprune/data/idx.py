"""MNIST-style idx files (plain or gzip), found offline before anything is downloaded.

MNIST and Fashion-MNIST ship as four idx files (Y. LeCun's format: a 4-byte magic whose third
byte is the element type and fourth the number of dimensions, then one big-endian uint32 per
dimension, then the data). torchvision's loaders insist on their own folder layout and download
when it is missing; this reader takes the files wherever they are. Search order for a set:

1. an explicit ``root`` (the files directly in it, or torchvision's ``<root>/<Name>/raw``);
2. the Debian package's folder (``apt-get install dataset-fashion-mnist`` puts the canonical
   Fashion-MNIST under ``/usr/share/datasets/fashion-mnist/``);
3. the cache (``~/.cache/autoprune/data``, same two layouts).

Only when none holds all four files does the caller fall back to torchvision's download.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import AutopruneError

FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# data set name -> (torchvision's folder name, Debian's folder, Debian's package)
SETS = {
    "fashionmnist": ("FashionMNIST", "/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist"),
    "mnist": ("MNIST", "/usr/share/datasets/mnist", None),
}
CLASSES = {
    "fashionmnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in one idx file (``.gz`` or plain). Raises AutopruneError on a corrupt file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise AutopruneError(f"idx file {str(path)!r} could not be read ({exc}); delete it or replace it "
                             "with the original download") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise AutopruneError(f"idx file {str(path)!r} has no idx header; is it an MNIST-style idx file?")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4")) if ndim else ()
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise AutopruneError(f"idx file {str(path)!r} is truncated or corrupt: header says shape {dims} "
                             f"({expected} bytes of data), file holds {len(raw) - header}; download it again")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _in(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in FILES.items():
        hit = next((folder / (stem + ext) for ext in (".gz", "") if (folder / (stem + ext)).is_file()), None)
        if hit is None:
            return None
        found[key] = hit
    return found


def candidate_folders(name: str, root: str | None, cache: str) -> list[Path]:
    """Folders searched for ``name``'s idx files, in order (see the module docstring)."""
    tv_name, debian, _ = SETS[name]
    out: list[Path] = []
    if root:
        r = Path(root).expanduser()
        out += [r, r / tv_name / "raw"]
    if debian:
        out.append(Path(debian))
    c = Path(cache).expanduser()
    out += [c, c / tv_name / "raw"]
    return out


def find_idx(name: str, root: str | None, cache: str) -> dict[str, Path] | None:
    """Paths of the four idx files of ``name`` ('mnist' or 'fashionmnist'), or None if no folder has all."""
    for folder in candidate_folders(name, root, cache):
        found = _in(folder)
        if found is not None:
            return found
    return None


def load_idx_set(files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images (N, 28, 28) uint8, train labels (N,), test images, test labels) from :func:`find_idx`."""
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.dtype != np.uint8:
            raise AutopruneError(f"idx files {str(files[split + '_x'])!r} / {str(files[split + '_y'])!r} do not "
                                 f"match: images {x.shape} {x.dtype}, labels {y.shape}; expected uint8 (N, H, W) "
                                 "and (N,)")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= 10):
            raise AutopruneError(f"idx labels {str(files[split + '_y'])!r} hold {int(y.min())}..{int(y.max())}; "
                                 "MNIST-style labels are 0..9: is it the right file?")
    return arrays["train_x"], arrays["train_y"].astype(np.int64), arrays["test_x"], arrays["test_y"].astype(np.int64)


def missing_message(name: str, root: str | None, cache: str, error: BaseException) -> str:
    """One line for a user without the files and without network: where we looked and the fixes."""
    folders = ", ".join(str(f) for f in candidate_folders(name, root, cache))
    package = SETS[name][2]
    offline = f"install them offline with `apt-get install {package}`, or " if package else ""
    return (f"data set {name!r}: idx files not found in {folders} and the download failed "
            f"({type(error).__name__}); {offline}put the four idx files in one of those folders "
            f"(or set data root), or allow the download into {cache}")
