"""Feature Shift Minimisation (Duan et al., 2022): remove the channels whose loss shifts the next
layer's input least, and put the expected shift back as a constant.

A BN output channel is modelled as ``N(beta_k, gamma_k^2)``; after a ReLU its expected value is
``E_k = beta_k Phi(beta_k/|gamma_k|) + |gamma_k| phi(beta_k/|gamma_k|)``. Removing channel k shifts
consumer output j by ``E_k * sum_hw W[j, k]``; the score is the mean ``|shift|`` over j, averaged
over the group's consumers. Compensation adds the removed channels' shift to the consumer's bias,
or subtracts it from the running mean of a BN reading the consumer's output (equal in eval mode).

What each consumer reads is found by tracing the model (``torch.fx``) and carrying a per-channel
(mean, variance) from every BN to the consumers' inputs. Approximations:

- BN -> ReLU / ReLU6 / Hardtanh: exact clipped-Gaussian moments; other elementwise activations
  (SiLU, GELU, Hardswish, ...): 40-point Gauss-Hermite quadrature.
- Residual adds before the activation (ResNet): summands independent, means and variances add,
  the sum is taken as Gaussian again, so a consumer deep in a stream sees the chain of BNs before
  it (within about 5 % of a Monte Carlo run through a random ResNet-20, on average per consumer).
  Adds after the last BN (MobileNetV2) are linear: exact.
- Depthwise passthrough: the BN after the depthwise conv resets the moments, so its consumers are
  scored from that BN and the activation after it.
- Average pooling, dropout and flatten keep each channel's mean (flatten repeats it over one
  Linear column per position). Max pooling also passes the mean on: a lower bound (on a trained
  digits CNN the measured mean after a 2x2 max pool is about twice as large).
- Conv consumers use the sum over all kernel taps: exact away from zero-padded borders. (Weighting
  taps by how often they see the image matches the spatial mean better, but lost accuracy on
  digits, whose content sits in the centre.)
- Anything else (products such as squeeze-excitation, untraceable models): the consumer falls back
  to ``E[ReLU(N(sum beta, sum gamma^2))]`` over the group's BNs (those after the depthwise conv if
  there is one), or 1 without BN; ``info["fallback_consumers"]`` names them.

``compensation="measured"`` uses the mean of each consumer's input over a few training batches
instead (eval mode, forward pre-hooks). Widths come from the shared allocation. The ``layerwise``
schedule removes groups shallow to deep in the engine's training loop (a before-step hook removes the
next group every ``layerwise_steps`` steps, each group's steps one cosine of the learning rate), the
removed channels held at zero; the engine then cuts them.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.calibrate import calibration_batches
from ..engine.graph import ChannelGroup
from ..errors import AutopruneError
from ..train import Callbacks, TrainConfig, segment_schedule, steps_per_epoch
from .base import MethodOutput, PruneContext, PruningMethod, Training
from .moments import ConsumerInputs, fallback_mean, gaussian_inputs, measured_inputs

log = logging.getLogger(__name__)


COMPENSATIONS = ("none", "gaussian", "measured")
SCHEDULES = ("oneshot", "layerwise")
DEFAULT_CALIBRATION_BATCHES = 8
LAYERWISE_SHARE = 1 / 3  # of a trial's epochs spent fine-tuning between groups (layerwise schedule)


@dataclass(frozen=True)
class FSMParams:
    compensation: str = "gaussian"  # none | gaussian (BN model) | measured (calibration batches)
    schedule: str = "oneshot"  # oneshot | layerwise (groups shallow to deep, fine-tuning between)
    # training batches whose means replace the BN model: every consumer with "measured", the consumers
    # no BN models with "gaussian" (a network without BN); 0 = the default, 8
    calibration_batches: int = 0
    layerwise_steps: int = 0  # optimizer steps after each group; 0 = the method's epochs spread evenly

    def __post_init__(self) -> None:
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {', '.join(COMPENSATIONS)}, got {self.compensation!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.calibration_batches < 0 or self.layerwise_steps < 0:
            raise ValueError("calibration_batches and layerwise_steps must be >= 0")
        if self.calibration_batches and self.compensation == "none":
            raise ValueError("calibration_batches is read only by compensation 'gaussian' or 'measured'; "
                             "drop it or choose one of those")

    @property
    def batches(self) -> int:
        return self.calibration_batches or DEFAULT_CALIBRATION_BATCHES


def _shifts(model: nn.Module, g: ChannelGroup, consumer: str, inputs: ConsumerInputs) -> Tensor:
    """``[outputs, channels]``: mean shift of each consumer output when each channel of ``g`` goes."""
    w = model.get_submodule(consumer).weight.detach().float()
    w = w.sum(tuple(range(2, w.dim()))) if w.dim() > 2 else w  # conv: all taps (exact away from borders)
    idx = torch.tensor(g.member(consumer, "in").index, device=w.device)
    return (w * inputs.mean[consumer].to(w.device)[None, :])[:, idx].sum(-1)


def group_scores(model: nn.Module, g: ChannelGroup, inputs: ConsumerInputs) -> Tensor:
    """FSM score per channel of ``g``: mean |shift| over consumer outputs, averaged over consumers."""
    per = [_shifts(model, g, c, inputs).abs().mean(0).cpu() for c in g.consumers]
    return torch.stack(per).mean(0) if per else fallback_mean(model, g)


@torch.no_grad()
def compensate(model: nn.Module, g: ChannelGroup, inputs: ConsumerInputs, removed: Sequence[int]) -> float:
    """Put the removed channels' expected contribution back into each consumer as a constant.

    Into the running mean of the BN that reads the consumer's output, if any (no new parameter),
    else into the consumer's bias (created if missing). Returns the largest |shift| put back.
    """
    largest = 0.0
    for c in g.consumers if removed else ():
        if c in inputs.unmodelled:  # no BN and no data: a placeholder mean must not be put back
            continue
        delta = _shifts(model, g, c, inputs)[:, list(removed)].sum(1)
        largest = max(largest, float(delta.abs().max()))
        bn = model.get_submodule(inputs.bn_after[c]) if c in inputs.bn_after else None
        if bn is not None and bn.running_mean is not None and bn.running_mean.shape == delta.shape:
            bn.running_mean.sub_(delta.to(bn.running_mean))
            continue
        module = model.get_submodule(c)
        if module.bias is None:
            module.bias = nn.Parameter(module.weight.new_zeros(module.weight.shape[0]))
        module.bias.add_(delta.to(module.bias))
    return largest


# --------------------------------------------------------------------------- the method


def _zero_channels(model: nn.Module, g: ChannelGroup, removed: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Zero what produces the removed channels (leaders, BNs, passthroughs); returns (param, rows) pairs."""
    frozen = []
    with torch.no_grad():
        for m in (m for m in g.members if m.dim == "out"):
            module = model.get_submodule(m.module)
            rows = sorted({i for c in removed for i in m.index[c]})
            for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if isinstance(p, nn.Parameter):
                    idx = torch.tensor(rows, device=p.device, dtype=torch.long)
                    p[idx] = 0
                    frozen.append((p, idx))
    return frozen


class FSM(PruningMethod[FSMParams]):
    name = "fsm"
    Params = FSMParams
    summary = "feature shift minimisation: BN-modelled mean shift at the consumers, put back as a bias"
    notes = (
        ("compensation=gaussian: the BN model where the network has BNs, means over calibration_batches "
        "training batches (0 = 8) where it has none; without data those consumers are left uncompensated"),
        ("a constant put into the running mean of a BN after the consumer is re-estimated by the engine's BN "
        "recalibration (on by default with data): there the recalibration does the compensation's work"),
    )

    def training_epochs(self, params: FSMParams, total_epochs: int) -> int:
        """The layerwise schedule fine-tunes between groups with a third of the trial's epochs."""
        return round(total_epochs * LAYERWISE_SHARE) if params.schedule == "layerwise" else 0

    def scores(self, ctx: PruneContext, params: FSMParams) -> dict[str, Tensor]:
        """FSM score per channel of every prunable group; the model is not modified."""
        inputs = self._inputs(ctx, params, ctx.prunable)
        return {g.name: group_scores(ctx.model, g, inputs) for g in ctx.prunable}

    def prepare(self, ctx: PruneContext, params: FSMParams) -> Training | None:
        """``layerwise``: groups are removed shallow to deep, one every ``layerwise_steps`` steps of the
        engine's loop (a before-step hook), the removed channels held at zero after every step."""
        if params.schedule != "layerwise":
            return None
        if ctx.data is None:
            raise AutopruneError("fsm schedule='layerwise' fine-tunes between groups and needs training data: "
                                 "pass data= to prune(), or use schedule='oneshot'")
        run = _Layerwise(self, ctx, params)
        teacher = copy.deepcopy(ctx.model).eval() if run.total and run.cfg.distill_alpha > 0 else None
        callbacks = Callbacks(before_step=run.before_step, after_step=run.after_step, lr_at=run.lr_at)
        return Training(callbacks=callbacks, state=run, steps=run.total, teacher=teacher)

    def finalize(self, ctx: PruneContext, params: FSMParams, training: Training | None) -> MethodOutput:
        groups = ctx.prunable
        if training is not None:  # layerwise: every group not yet removed is removed now
            run = training.state
            assert isinstance(run, _Layerwise)
            run.remove_up_to(len(run.todo))
            info = dict(run.info, layerwise_steps_per_group=run.per_group)
            return MethodOutput(keep=run.keep, model=ctx.model, info=info)
        inputs = self._inputs(ctx, params, groups)
        scores = {g.name: group_scores(ctx.model, g, inputs) for g in groups}
        widths = ctx.allocate(scores)
        keep = ctx.select(scores, widths)
        info: dict[str, Any] = _inputs_info(inputs)
        if params.compensation != "none":
            shifts = [compensate(ctx.model, g, inputs, _removed(g, keep[g.name])) for g in groups]
            info["max_compensation"] = max(shifts, default=0.0)
        return MethodOutput(keep=keep, model=ctx.model, info=info)

    def _inputs(self, ctx: PruneContext, params: FSMParams, groups: Sequence[ChannelGroup]) -> ConsumerInputs:
        """What each consumer reads: the BN model where the network has BNs, calibration means where
        it does not (or everywhere with ``measured``); without data, consumers no BN models are
        scored with a placeholder and left uncompensated (``inputs.unmodelled``)."""
        inputs = gaussian_inputs(ctx.model, groups, ctx.input_shape)
        if params.compensation == "none":
            return inputs
        wanted = [c for g in groups for c in g.consumers] if params.compensation == "measured" else \
            [c for c in inputs.fallback if c in inputs.no_bn]
        if not wanted:
            return inputs
        if ctx.data is None:
            if params.compensation == "measured":
                raise AutopruneError("fsm compensation='measured' needs calibration data: pass data= to prune(), "
                                     "or use compensation='gaussian'")
            inputs.unmodelled = sorted(set(wanted))
            return inputs
        batch_size = ctx.train_cfg.batch_size if ctx.train_cfg is not None else 128
        batches = calibration_batches(ctx.data.train, params.batches, batch_size, ctx.seed)
        measured = measured_inputs(ctx.model, set(wanted), batches)
        inputs.mean.update({c: v for c, v in measured.items() if v.shape == inputs.mean[c].shape})
        inputs.measured = sorted(measured)
        return inputs


def _inputs_info(inputs: ConsumerInputs) -> dict[str, Any]:
    return {"fallback_consumers": inputs.fallback, "measured_consumers": inputs.measured,
            "uncompensated_consumers": inputs.unmodelled}


class _Layerwise:
    """FSM's layer-by-layer schedule on the engine's loop: group i goes at step i x ``per_group``."""

    def __init__(self, method: FSM, ctx: PruneContext, params: FSMParams) -> None:
        self.method, self.ctx, self.params = method, ctx, params
        self.cfg = ctx.train_cfg if ctx.train_cfg is not None else TrainConfig(epochs=1)
        inputs = method._inputs(ctx, params, ctx.prunable)
        self.info = _inputs_info(inputs)
        self.widths = ctx.allocate({g.name: group_scores(ctx.model, g, inputs) for g in ctx.prunable})
        self.todo = [g for g in ctx.prunable if self.widths[g.name] < g.channels]  # groups come in depth order
        self.keep = {g.name: tuple(range(g.channels)) for g in ctx.prunable if self.widths[g.name] >= g.channels}
        per_group = params.layerwise_steps
        if not per_group and self.todo:
            per_group = self.cfg.epochs * steps_per_epoch(len(ctx.data.train), self.cfg.batch_size) // len(self.todo)
        self.per_group = per_group
        self.total = per_group * len(self.todo)
        self.done = 0
        self.frozen: list[tuple[Tensor, Tensor]] = []
        # each group's steps run one cosine from the full rate (as a fine-tune of its own would)
        self.segment = segment_schedule(self.cfg.lr, per_group)

    def lr_at(self, step: int) -> float:
        return self.segment(step % max(1, self.per_group))

    def before_step(self, _model: nn.Module, step: int) -> None:
        self.remove_up_to(step // max(1, self.per_group) + 1)

    def after_step(self, _model: nn.Module, _step: int) -> None:
        """Removed channels stay zero (momentum and weight decay would move them otherwise)."""
        with torch.no_grad():
            for p, idx in self.frozen:
                p[idx] = 0

    def remove_up_to(self, n: int) -> None:
        """Remove (score, compensate, zero) the groups of ``todo`` before index ``n`` not yet removed."""
        model, ctx = self.ctx.model, self.ctx
        while self.done < min(n, len(self.todo)):
            g = self.todo[self.done]
            inputs = self.method._inputs(ctx, self.params, [g])
            kept = ctx.select({g.name: group_scores(model, g, inputs)}, {g.name: self.widths[g.name]})[g.name]
            self.keep[g.name] = kept
            removed = _removed(g, kept)
            if self.params.compensation != "none":
                compensate(model, g, inputs, removed)
            self.frozen += _zero_channels(model, g, removed)
            log.info("fsm: %s keeps %d of %d channels (%d fine-tuning steps)", g.name, self.widths[g.name],
                     g.channels, self.per_group)
            self.done += 1


def _removed(g: ChannelGroup, kept: Sequence[int]) -> list[int]:
    kept_set = set(kept)
    return [c for c in range(g.channels) if c not in kept_set]
