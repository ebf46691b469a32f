"""Image folders (``imagefolder:<dir>``, one sub-folder per class) read safely.

torchvision's ``ImageFolder`` walks with ``os.walk(followlinks=True)``: a symlink loop (``a/up -> ..``,
``a/self -> .``) makes it list the same images many times, so one image lands in train *and* val (a
random-image folder then scores 98.5 % "validation" accuracy), and a dangling symlink or an unreadable
file fails deep inside a DataLoader worker with a message that names no file. :class:`SafeImageFolder`
replaces the scan: every directory is entered once (by its real path, so each symlink is followed at
most once and loops end), every image file is listed once (two links to one file count once), a
dangling symlink is one line naming it, and an image that cannot be decoded is one line naming it
when it is read. The order of the samples is torchvision's (class, folder, file name), so a folder
without links splits exactly as before.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from ..errors import AutopruneError

log = logging.getLogger(__name__)


class UnreadableImage(AutopruneError):
    """An image file that cannot be opened or decoded (the message names it)."""


def scan_images(directory: str, class_to_idx: dict[str, int],
                extensions: tuple[str, ...]) -> list[tuple[str, int]]:
    """(path, class index) of every image below each class folder, each real file once, loops cut.

    Raises ``AutopruneError`` naming the first dangling symlink among the images."""
    samples: list[tuple[str, str, str, int]] = []
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    skipped = 0
    for cls in sorted(class_to_idx):
        stack = [os.path.join(directory, cls)]
        while stack:
            folder = stack.pop()
            real = os.path.realpath(folder)
            if real in seen_dirs:  # a loop, or a second link to a folder already listed
                skipped += 1
                continue
            seen_dirs.add(real)
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                raise AutopruneError(f"image folder {directory!r}: cannot list {folder} ({exc.strerror or exc}); "
                                     "fix its permissions or remove it") from None
            for entry in entries:
                if _is_dir(entry):
                    stack.append(entry.path)
                    continue
                if not entry.name.lower().endswith(extensions):
                    continue
                if entry.is_symlink() and not os.path.exists(entry.path):
                    raise AutopruneError(f"image folder {directory!r}: {entry.path} is a dangling symlink (to "
                                         f"{os.readlink(entry.path)!r}, which does not exist); remove it or restore "
                                         "its target")
                real_file = os.path.realpath(entry.path)
                if real_file in seen_files:
                    skipped += 1
                    continue
                seen_files.add(real_file)
                samples.append((os.path.dirname(entry.path), entry.name, entry.path, class_to_idx[cls]))
    if skipped:
        log.warning("image folder %s: %d symlinked folders or files point at what is already listed "
                    "(a loop or a duplicate); each image is used once", directory, skipped)
    samples.sort(key=lambda s: (s[3], s[0], s[1]))  # torchvision's order: class, folder, file name
    return [(path, target) for _, _, path, target in samples]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def load_image(path: str) -> Any:
    """The RGB PIL image at ``path``; ``UnreadableImage`` naming it when it cannot be read."""
    try:
        return default_loader(path)
    except Exception as exc:  # noqa: BLE001 - PIL.UnidentifiedImageError, OSError, DecompressionBombError
        raise UnreadableImage(f"image {path} cannot be read ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:160]}); remove or replace it") from None


class SafeImageFolder(datasets.ImageFolder):
    """torchvision's ``ImageFolder`` with :func:`scan_images` and :func:`load_image` (module docstring)."""

    def __init__(self, root: str, transform: Any = None) -> None:
        super().__init__(root, transform=transform, loader=load_image)

    @staticmethod
    def make_dataset(directory: str, class_to_idx: dict[str, int], extensions: Any = None,
                     is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        samples = scan_images(directory, class_to_idx, tuple(extensions or IMG_EXTENSIONS))
        if not samples and not allow_empty:
            raise FileNotFoundError(f"found no image files ({', '.join(IMG_EXTENSIONS)}) in the class folders")
        return samples


def worker_error(exc: BaseException) -> AutopruneError:
    """A DataLoader worker's error as one line: torch re-raises it with the worker's traceback in the
    message; the last line holds the original message."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    head, sep, rest = last.partition(": ")
    if sep and head.rsplit(".", 1)[-1].endswith(("Error", "Image")):
        last = rest
    return AutopruneError(last)
