"""Training and evaluation: fit / evaluate / distil; the one training loop (the engine's, DESIGN.md 4).

The loop knows nothing about pruning: methods (through :mod:`autoprune.engine.training`) and the
search extend it with the hooks of :class:`Callbacks`. Helpers live in :mod:`autoprune.train_support`.

Recipe: SGD + Nesterov momentum, weight decay on conv/linear weights only, cosine learning
rate per step with optional linear warm-up, label smoothing, optional distillation.
On CUDA: mixed precision (bf16, or fp16 with a GradScaler; ``TrainConfig.amp_dtype`` picks, default
bf16 where supported) and channels-last (``TrainConfig.channels_last``); on CPU plain fp32.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import progress as _progress
from .errors import AutopruneError
from .models.outputs import logits_of
from .train_support import (
    CUDA_CHECK_EVERY,
    LossMonitor,
    NonFiniteLoss,
    amp_dtype_for,
    autocast,
    grad_scaler,
    prefer_epoch,
    raise_if_bad,
    resolve_device,
    segment_schedule,
    steps_per_epoch,
    to_device,
    training_loss,
)

__all__ = ["AMP_DTYPES", "Callbacks", "FitResult", "NonFiniteLoss", "Split", "TrainConfig", "amp_dtype_for",
           "default_param_groups", "evaluate", "fit", "lr_schedule", "prefer_epoch", "resolve_device",
           "segment_schedule", "steps_per_epoch"]

logger = logging.getLogger(__name__)

AMP_DTYPES = ("auto", "bf16", "fp16")


class Split(Protocol):
    """What fit/evaluate need from a data split (see autoprune.data.datasets.Split)."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                augment: bool | tuple[str, ...] = False) -> Iterator[tuple[Tensor, Tensor]]: ...


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0      # may be fractional (0.5 = half an epoch of linear warm-up)
    distill_alpha: float = 0.0      # weight of the distillation term (needs a teacher when > 0)
    distill_temperature: float = 4.0
    distill_until: float | None = None  # stop distilling after the first epoch whose val acc reaches this
    #                                     (the teacher's own val acc: a student that caught up with its teacher)
    amp: bool = True                # mixed precision; used only on CUDA
    amp_dtype: str = "auto"         # "auto" (bf16 where the GPU supports it, else fp16), "bf16" or "fp16"
    #                                 (fp16 with a GradScaler); read only when amp is on, on CUDA
    channels_last: bool = True      # on CUDA: model and batches in channels-last memory format
    augment: bool | tuple[str, ...] = False  # Split.batches of the training split: names ("crop", "flip")
    #                                         or True for the legacy rule (autoprune.data.datasets.augment_batch)
    seed: int = 0                   # shuffling order and the RNG used during training

    def __post_init__(self) -> None:
        if isinstance(self.augment, (list, tuple)):  # a list from JSON/YAML: keep the config hashable
            object.__setattr__(self, "augment", tuple(str(a) for a in self.augment))
        from .limits import MAX_BATCH_SIZE, MAX_EPOCHS

        checks = {
            "epochs": 0 <= self.epochs <= MAX_EPOCHS,
            "lr": 0 < self.lr < math.inf,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": 0 <= self.weight_decay < math.inf,
            "batch_size": 1 <= self.batch_size <= MAX_BATCH_SIZE,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "warmup_epochs": self.warmup_epochs >= 0,
            "distill_alpha": 0 <= self.distill_alpha <= 1,
            "distill_temperature": self.distill_temperature > 0,
            "distill_until": self.distill_until is None or 0 <= self.distill_until <= 1,
        }
        allowed = {"epochs": f"in [0, {MAX_EPOCHS}]", "lr": "> 0 and finite", "momentum": "in [0, 1)",
                   "weight_decay": ">= 0 and finite", "batch_size": f"in [1, {MAX_BATCH_SIZE}]", "label_smoothing": "in [0, 1)", "warmup_epochs": ">= 0",
                   "distill_alpha": "in [0, 1]", "distill_temperature": "> 0",
                   "distill_until": "None or in [0, 1]"}
        for name, ok in checks.items():
            if not ok:
                raise AutopruneError(f"training setting {name}={getattr(self, name)!r} is invalid; "
                                     f"it must be {allowed[name]}")
        if self.amp_dtype not in AMP_DTYPES:
            raise AutopruneError(f"training setting amp_dtype={self.amp_dtype!r} is invalid; "
                                 f"it must be one of {', '.join(AMP_DTYPES)}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Callbacks:
    """Optional hooks of :func:`fit`; ``step`` counts optimizer steps from 0 over the whole run.

    Order within one step: ``before_step`` -> forward/backward -> ``after_backward`` (edit gradients)
    -> optimizer step -> ``after_step`` -> ``should_stop``. At the end of every epoch the validation
    split (if any) is evaluated on the model ``reading`` gives (default: the model as trained), and
    ``on_epoch_end`` receives the metrics; it returns True to stop (the reporting callback).
    """

    param_groups: Callable[[nn.Module], list[dict]] | None = None  # custom optimizer groups
    # called once with the optimizer fit built, before the first step (e.g. to read its momentum state)
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None
    before_step: Callable[[nn.Module, int], None] | None = None
    after_backward: Callable[[nn.Module, int], None] | None = None
    after_step: Callable[[nn.Module, int], None] | None = None
    on_epoch_end: Callable[[int, dict], bool | None] | None = None
    should_stop: Callable[[], bool] | None = None  # a stop signal, polled after every step
    # the model the epoch's validation reading measures: a context within which the model computes
    # it (e.g. ResRep's masked, BN-re-estimated model); it yields extra metrics (e.g. its MACs)
    reading: Callable[[], contextlib.AbstractContextManager[dict]] | None = None
    lr_at: Callable[[int], float] | None = None  # learning rate per step (default: lr_schedule(cfg))


@dataclass(frozen=True)
class FitResult:
    epochs_run: int
    stopped_early: bool
    history: tuple[dict, ...]       # one metrics dict per epoch run: epoch, train_loss, val_acc, val_loss,
    #                                 distilled (the teacher ran this epoch), lr, seconds
    best_val_acc: float             # nan when fit had no validation split
    final_val_acc: float


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning rate at each global step: linear warm-up, then cosine from cfg.lr toward 0.

    With W warm-up steps the rate climbs lr/W, 2lr/W, ..., lr; the cosine then runs over the
    remaining steps and reaches ~0 at the last one (not exactly 0: the last step still learns).
    """
    total = max(1, steps_per_epoch * cfg.epochs)
    return segment_schedule(cfg.lr, total, min(total, round(cfg.warmup_epochs * steps_per_epoch)))


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: conv/linear weights with weight decay, everything else without.

    Why no decay on BatchNorm parameters and biases: they add no capacity worth regularising
    (a channel's scale and shift), and with BN after a conv the conv weight's scale is
    irrelevant to the output, so decay there only tunes the effective step size, whereas decay
    on gamma/beta shrinks what the network actually computes. It also biases the channel scores
    that FSM and BN-based criteria read from gamma/beta. Common practice since Goyal et al. 2017
    ("Accurate, Large Minibatch SGD") and He et al. 2019 ("Bag of Tricks").
    """
    decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            w = module.weight
            if isinstance(w, nn.Parameter) and w.requires_grad and id(w) not in seen:
                seen.add(id(w))
                decay.append(w)
    no_decay = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, device: str | torch.device, batch_size: int = 512) -> dict:
    """{'acc', 'loss'} (mean cross-entropy, no smoothing) in eval mode; moves the model to device.

    Runs in fp32 so reported accuracies do not depend on the precision the trial trained in.
    Each module's train/eval mode is restored afterwards.
    """
    device = resolve_device(device)
    n = len(split)
    if n == 0:
        raise AutopruneError("cannot evaluate on an empty split; check the data set's split fractions")
    model.to(device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for x, y in split.batches(batch_size, shuffle=False):
            x, y = to_device(x, device), y.to(device, non_blocking=True)
            logits = logits_of(model, model(x)).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(dim=1) == y).sum()
    finally:
        for m, training in modes.items():
            m.training = training
    return {"acc": correct.item() / n, "loss": loss_sum.item() / n}


def fit(model: nn.Module, train: Split, val: Split | None, cfg: TrainConfig, device: str | torch.device,
        callbacks: Callbacks | None = None, teacher: nn.Module | None = None,
        progress: bool | str = False, steps: int | None = None) -> FitResult:
    """Train model in place on train for cfg.epochs; evaluate on val after every epoch.

    ``steps``: train exactly this many optimizer steps instead (epochs of the split, the last one
    cut short; the learning-rate schedule spans them). Progress goes to :mod:`autoprune.progress` (the
    caller's reporter renders it): a phase named ``progress`` when it is a string (e.g. "base small_cnn
    on digits"), else "train", counting epochs, and inside it one phase per epoch (``epoch 3/20``)
    counting optimizer steps.

    Moves model (and teacher) to device; on CUDA also to channels-last. Raises NonFiniteLoss
    when the loss becomes NaN/inf (the weights are then unusable: on CUDA the check runs every
    few steps). Each module's train/eval mode is restored. Global RNG state is restored too:
    training randomness (shuffling, dropout) comes from cfg.seed alone.
    """
    callbacks = callbacks or Callbacks()
    device = resolve_device(device)
    if len(train) == 0:
        raise AutopruneError("the training split is empty; check the data set's split fractions")
    if cfg.distill_alpha > 0 and teacher is None:
        raise AutopruneError(f"distill_alpha={cfg.distill_alpha} needs a teacher model; "
                             "pass a teacher or set distill_alpha to 0")
    if teacher is not None and cfg.distill_alpha == 0:
        teacher = None  # its logits would be multiplied by zero: do not pay for them
    if steps is not None:
        spe = steps_per_epoch(len(train), cfg.batch_size)
        cfg = replace(cfg, epochs=math.ceil(steps / spe))
    channels_last = device.type == "cuda" and cfg.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    modes = {m: m.training for m in model.modules()}
    teacher_modes = {m: m.training for m in teacher.modules()} if teacher is not None else {}
    if teacher is not None:
        teacher.to(device)
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
        teacher.eval()
    on_cuda = device.type == "cuda"
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] if on_cuda else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.random.default_generator.manual_seed(cfg.seed)
            if on_cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(cfg.seed)
            return _Loop(model, train, cfg, device, callbacks, teacher, steps).run(val, progress)
    finally:
        for m, training in (modes | teacher_modes).items():
            m.training = training


class _Loop:
    """One run of :func:`fit`: the optimizer, the schedule and the step, epoch and stop logic."""

    def __init__(self, model: nn.Module, train: Split, cfg: TrainConfig, device: torch.device,
                 callbacks: Callbacks, teacher: nn.Module | None, steps: int | None) -> None:
        self.model, self.train, self.cfg, self.device = model, train, cfg, device
        self.callbacks, self.teacher = callbacks, teacher
        spe = steps_per_epoch(len(train), cfg.batch_size)
        self.total = steps if steps is not None else spe * cfg.epochs
        if callbacks.lr_at is not None:
            self.lr_at = callbacks.lr_at
        else:  # the cosine spans the steps actually run
            self.lr_at = lr_schedule(cfg, spe) if steps is None else _steps_schedule(cfg, spe, steps)
        groups = (callbacks.param_groups(model) if callbacks.param_groups is not None
                  else default_param_groups(model, cfg.weight_decay))
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                         weight_decay=cfg.weight_decay)
        if callbacks.on_optimizer is not None:
            callbacks.on_optimizer(self.optimizer)
        # Groups may carry their own lr: the schedule scales each group's base rate by the same factor.
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.amp_dtype = amp_dtype_for(cfg, device)
        self.scaler = grad_scaler(enabled=self.amp_dtype is torch.float16)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.monitor = LossMonitor(CUDA_CHECK_EVERY if device.type == "cuda" else 1)
        self.step = 0
        self.signalled = False  # should_stop said so

    def run(self, val: Split | None, progress: bool | str) -> FitResult:
        history: list[dict] = []
        stopped_early = False
        label = progress if isinstance(progress, str) else "train"
        with _progress.phase(label, total=self.cfg.epochs, unit="epoch") as run:
            for epoch in range(1, self.cfg.epochs + 1):
                metrics = self._epoch(epoch, val)
                history.append(metrics)
                self._caught_up(epoch, metrics)
                run.advance(postfix=f"loss {metrics['train_loss']:.4f}, val_acc {metrics['val_acc']:.4f}")
                report = self.callbacks.on_epoch_end
                if self.signalled or (report is not None and report(epoch, dict(metrics))):
                    stopped_early = epoch < self.cfg.epochs or self.step < self.total
                    logger.info("stopped after epoch %d (%s)", epoch, "stop signal" if self.signalled else
                                "on_epoch_end")
                    break
        self.optimizer.zero_grad(set_to_none=True)  # do not keep a gradient-sized copy of the model alive
        if history:
            accs = [h["val_acc"] for h in history]
            best = math.nan if val is None else max(accs)
            final = accs[-1]
        else:  # epochs == 0: report the starting point
            final = evaluate(self.model, val, self.device)["acc"] if val is not None else math.nan
            best = final
        return FitResult(epochs_run=len(history), stopped_early=stopped_early, history=tuple(history),
                         best_val_acc=best, final_val_acc=final)

    def _caught_up(self, epoch: int, metrics: dict) -> None:
        """``distill_until`` reached: the teacher is dropped for the remaining epochs (cross-entropy alone)."""
        until = self.cfg.distill_until
        if self.teacher is not None and until is not None and metrics["val_acc"] >= until:
            logger.info("epoch %d: val_acc %.4f reached the teacher's %.4f: distillation stops", epoch,
                        metrics["val_acc"], until)
            self.teacher = None

    def _epoch(self, epoch: int, val: Split | None) -> dict:
        start = time.perf_counter()
        self.model.train()
        batches = self.train.batches(self.cfg.batch_size, shuffle=True, generator=self.generator,
                                     augment=self.cfg.augment)
        spe = min(steps_per_epoch(len(self.train), self.cfg.batch_size), self.total - self.step)
        with _progress.phase(f"epoch {epoch}/{self.cfg.epochs}", total=spe, unit="step") as shown:
            for step, (x, y) in enumerate(batches, start=1):
                if self.step >= self.total:
                    break
                self._step(x, y, (epoch, step, self.step))
                shown.advance()
                if self.callbacks.should_stop is not None and self.callbacks.should_stop():
                    self.signalled = True
                    break
            self.monitor.flush()
            raise_if_bad(self.monitor, self.lr_at)
            train_loss = self.monitor.epoch_mean()
            metrics = {"epoch": epoch, "train_loss": train_loss, **self._reading(val),
                       "distilled": self.teacher is not None, "lr": self.lr_at(max(0, self.step - 1)),
                       "seconds": time.perf_counter() - start}
            shown.postfix = f"loss {train_loss:.4f}, val_acc {metrics['val_acc']:.4f}"
        logger.info("epoch %d/%d train_loss %.4f val_acc %.4f val_loss %.4f lr %.3g (%.1f s)", epoch,
                    self.cfg.epochs, train_loss, metrics["val_acc"], metrics["val_loss"], metrics["lr"],
                    metrics["seconds"])
        return metrics

    def _reading(self, val: Split | None) -> dict:
        if val is None:
            return {"val_acc": math.nan, "val_loss": math.nan}
        if self.callbacks.reading is None:
            extra: dict = {}
            got = evaluate(self.model, val, self.device)
        else:
            with self.callbacks.reading() as extra:
                got = evaluate(self.model, val, self.device)
        return {"val_acc": got["acc"], "val_loss": got["loss"], **extra}

    def _step(self, x: Tensor, y: Tensor, where: tuple[int, int, int]) -> None:
        cb, opt, step = self.callbacks, self.optimizer, self.step
        if cb.before_step is not None:
            cb.before_step(self.model, step)
        factor = self.lr_at(step) / self.cfg.lr
        for group, base in zip(opt.param_groups, self.base_lrs):
            group["lr"] = base * factor
        x, y = to_device(x, self.device, self.cfg.channels_last), y.to(self.device, non_blocking=True)
        with autocast(self.amp_dtype):
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = logits_of(self.teacher, self.teacher(x))
            cfg = self.cfg
            loss = training_loss(logits_of(self.model, self.model(x)), y, cfg.label_smoothing, teacher_logits,
                                 cfg.distill_alpha, cfg.distill_temperature)
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(opt)
        if cb.after_backward is not None:
            cb.after_backward(self.model, step)
        self.scaler.step(opt)
        self.scaler.update()
        if cb.after_step is not None:
            cb.after_step(self.model, step)
        self.monitor.add(loss.detach(), len(y), where)
        self.step += 1
        raise_if_bad(self.monitor, self.lr_at)


def _steps_schedule(cfg: TrainConfig, spe: int, steps: int) -> Callable[[int], float]:
    """:func:`lr_schedule` over ``steps`` optimizer steps (warm-up still counted in epochs of ``spe``)."""
    warmup = min(steps, round(cfg.warmup_epochs * spe))
    return segment_schedule(cfg.lr, steps, warmup)
