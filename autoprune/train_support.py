"""What the training loop (:mod:`autoprune.train`) uses and nothing else needs to know: devices,
mixed precision, the loss (cross-entropy with optional distillation), the loss monitor (finiteness
checks), the cosine schedule, the epoch preference.

The public names are re-exported by :mod:`autoprune.train`, where users import them.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import AutopruneError

# On CUDA, reading the loss every step forces a host/device sync that stalls the kernel queue;
# small models on GPU-resident data lose a noticeable share of throughput to it. We look at the
# losses every few steps instead (a NaN is still reported with its exact step).
CUDA_CHECK_EVERY = 25


class NonFiniteLoss(AutopruneError):
    """The training loss became NaN or infinite; the message names epoch, step and learning rate."""


def prefer_epoch(acc: float, loss: float, best_acc: float, best_loss: float) -> str | None:
    """Why an epoch with val ``acc``/``loss`` should replace the kept one, or None to keep the old one.

    Higher accuracy wins; on a tie (common on small validation splits, where accuracy moves in
    steps of one image) the lower validation loss wins, and on a tie of both the newer epoch, so
    training is never discarded for nothing. Callers offer epochs in order, oldest first.
    """
    if acc > best_acc:
        return "highest val accuracy"
    if acc < best_acc:
        return None
    if math.isnan(loss) or loss > best_loss:
        return None
    if math.isnan(best_loss) or loss < best_loss:
        return f"val accuracy tied, lower val loss ({loss:.4g} vs {best_loss:.4g})"
    return "val accuracy and loss tied: the later epoch"


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over n samples (the last, smaller batch counts)."""
    return math.ceil(n / batch_size)


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:N' as given (checked)."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise AutopruneError(f"unknown device {name!r}; use --device auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AutopruneError(f"--device {name} requested but no CUDA device is available; "
                                 "use --device auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AutopruneError(f"--device {name} requested but only {torch.cuda.device_count()} "
                                 "CUDA device(s) exist; use --device cuda or auto")
    return device


def segment_schedule(lr: float, total: int, warmup: int = 0) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` toward 0 over the rest of ``total``."""
    total = max(1, total)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return lr_at


class LossMonitor:
    """Per-step losses: finiteness checks (batched on CUDA) and the epoch's mean loss."""

    def __init__(self, check_every: int) -> None:
        self.check_every = check_every
        self.pending: list[tuple[Tensor, int, tuple[int, int, int]]] = []
        self.bad: tuple[float, tuple[int, int, int]] | None = None
        self.total = 0.0
        self.count = 0

    def add(self, loss: Tensor, n: int, where: tuple[int, int, int]) -> None:
        self.pending.append((loss, n, where))
        if len(self.pending) >= self.check_every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([loss.float() for loss, _, _ in self.pending]).cpu().tolist()  # one sync
        for value, (_, n, where) in zip(values, self.pending):
            if not math.isfinite(value):
                self.bad = (value, where)
                break
            self.total += value * n
            self.count += n
        self.pending.clear()

    def epoch_mean(self) -> float:
        mean = self.total / max(1, self.count)
        self.total, self.count = 0.0, 0
        return mean


def raise_if_bad(monitor: LossMonitor, lr_at: Callable[[int], float]) -> None:
    if monitor.bad is None:
        return
    value, (epoch, step, global_step) = monitor.bad
    kind = "nan" if math.isnan(value) else "inf"
    raise NonFiniteLoss(f"loss became {kind} at epoch {epoch} step {step} (global step {global_step}, "
                        f"lr={lr_at(global_step):.3g}); lower the learning rate (e.g. --lr), add warm-up "
                        "epochs, or disable mixed precision")


def to_device(x: Tensor, device: torch.device, channels_last: bool = True) -> Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(enabled: bool) -> Any:
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def training_loss(logits: Tensor, y: Tensor, label_smoothing: float, teacher_logits: Tensor | None = None,
                  alpha: float = 0.0, temperature: float = 4.0) -> Tensor:
    """Cross-entropy (``label_smoothing``), mixed with distillation when ``teacher_logits`` are given:
    ``(1 - alpha) x CE + alpha x T^2 x KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al.
    2015: the T^2 keeps the soft term's gradients on the same scale whatever the temperature). Logits
    (N, classes), labels (N,); a scalar."""
    logits = logits.float()
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return ce
    t = temperature
    kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    return (1.0 - alpha) * ce + alpha * kd


def amp_dtype_for(cfg: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype fit trains with under ``cfg`` (a :class:`autoprune.train.TrainConfig`: its ``amp``
    and ``amp_dtype``): None (fp32) on CPU or with ``amp`` off, else bf16 / fp16 as ``cfg.amp_dtype`` says ("auto": bf16 where the GPU supports it, fp16 elsewhere, e.g. V100/T4)."""
    if device.type != "cuda" or not cfg.amp:
        return None
    if cfg.amp_dtype == "bf16":
        return torch.bfloat16
    if cfg.amp_dtype == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
