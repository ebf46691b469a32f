"""Checks of numeric CLI flags, before any data is loaded: one line naming the flag, its value and range."""
from __future__ import annotations

import argparse
import math

from ..errors import AutopruneError


def non_negative(value: int, option: str) -> None:
    from ..limits import MAX_EPOCHS

    if value < 0:
        raise AutopruneError(f"{option} must be 0 or more, got {value}")
    if option == "--epochs" and value > MAX_EPOCHS:
        raise AutopruneError(f"--epochs {value} is more than the cap of {MAX_EPOCHS}; give fewer epochs")


def check_training(args: argparse.Namespace) -> None:
    """train's numeric flags, before any data is loaded: one line naming the flag and its range."""
    from ..limits import MAX_BATCH_SIZE

    checks = [("--lr", args.lr, 0 < args.lr < math.inf, "a finite number > 0, e.g. 0.05"),
              ("--batch-size", args.batch_size, 1 <= args.batch_size <= MAX_BATCH_SIZE, f"in [1, {MAX_BATCH_SIZE}]"),
              ("--weight-decay", args.weight_decay, 0 <= args.weight_decay < math.inf, "a finite number >= 0"),
              ("--label-smoothing", args.label_smoothing, 0 <= args.label_smoothing < 1, "in [0, 1)")]
    for flag, value, ok, allowed in checks:
        if not ok:
            raise AutopruneError(f"{flag} {value} is invalid; it must be {allowed}")


def float_list(text: str, option: str) -> tuple[float, ...]:
    """'0.6,1,1.4' -> (0.6, 1.0, 1.4); an empty item or a non-number is one error naming the option."""
    items = [item.strip() for item in text.split(",")]
    try:
        if any(not item for item in items):
            raise ValueError("an empty item")
        values = tuple(float(item) for item in items)
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError("not positive and finite")
        return values
    except ValueError:
        raise AutopruneError(f"{option} {text!r} is not a comma-separated list of positive numbers; write e.g. "
                             f"{option} 0.6,1,1.4") from None
