"""Caps on the resources a spec, a checkpoint or a flag may ask for.

A search spec can come from someone else (README, "Trust: what a received file can do"); without caps
``workers: 1000`` forks a thousand processes, ``epochs: 1e9`` or ``max_trials: 1e12`` never end (or
die later with a bare MemoryError), ``image_size: 100000`` allocates terabytes, ``--threads 100000``
crashed torch. Each cap is far above any sensible value, so only a mistake or a hostile file meets
it; the error is one line naming the key, the value and the cap.
"""
from __future__ import annotations

import os

MAX_EPOCHS = 10_000  # training epochs: base_epochs, space.epochs, --epochs
MAX_TRIALS = 100_000  # budget.max_trials, --max-trials
MAX_IMAGE_SIZE = 4096  # pixels per side (data.image_size, --image-size)
MAX_BUCKETS = 64  # space.buckets (depth buckets of the searched allocation)
MAX_BATCH_SIZE = 65_536  # samples per step
MAX_SEED = 2 ** 32 - 1  # seeds reach numpy's SeedSequence and torch.manual_seed
MAX_TRAIN_SUBSET = 10 ** 9


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_workers() -> int:
    """Worker processes one search may start on this machine: 4 per core, at least 8."""
    return max(8, 4 * cores())


def max_threads() -> int:
    """torch CPU threads per process: 4 per core, at least 8."""
    return max(8, 4 * cores())
