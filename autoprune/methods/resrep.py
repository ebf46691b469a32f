"""ResRep (Ding et al., ICCV 2021): decouple remembering and forgetting (DESIGN.md section 4).

Compactors (see :mod:`autoprune.methods.compactor`) are trained with penalty gradients
``g_i = m_i * dL/dQ_i + penalty * Q_i / ||Q_i||``: every row feels a group-lasso pull, and rows
chosen for forgetting (mask ``m_i = 0``) lose the task gradient that holds them up, so they shrink
toward zero. The mask grows on a schedule: no mask during a warm-up, then every ``mask_interval``
steps the shared allocator turns the compactor row norms (times the prior) into widths that meet the
target and each group masks its weakest channels, growing by at least ``growth`` channels per update
(recomputed from scratch each time, so masks can change; once complete and zero, final). See
:mod:`autoprune.methods.resrep_schedule`. Finally BN and compactors fold into the convs and the
masked channels are the ones the engine deletes. ResRep trains in the engine's loop: ``prepare``
returns its hooks (penalty gradients, mask schedule, its epoch reading), ``finalize`` folds.

Short trials. The original trains hundreds of epochs; a search trial has a few (the Fashion-MNIST
quality benchmark: 48 steps in all). What makes the method work there, each a parameter (numbers:
ResNet-20, 3 seeds, at 0.3 / 0.2 of the MACs, results/benchmarks/quality_fashionmnist_ablation_resrep.md;
default 0.869 / 0.843):

* the schedule scales to the trial: the interval is capped and the growth raised so the target is
  met after ``reach`` of the steps;
* ``forget_by``: with lambda ~1e-4 a masked row barely moves in a few hundred steps, and a lambda
  large enough to zero it also crushes every unmasked row. Masked rows instead get the gradient
  that moves them straight toward zero, in proportion to the learning rate, reaching it at
  ``forget_by`` of the steps (0 restores the plain rule). Unmasked rows keep the paper's rule;
* ``prior="l1"``: identity compactors all start with norm 1 and in a short trial the task gradient
  barely separates them, so their ranking is noise. The ranking multiplies each row norm by the
  channel's group-L1 magnitude at the start (as :mod:`autoprune.methods.l1` scores it, relative to
  its group's mean): informed from the first step, refined by training (``prior="none"``, the
  paper's ranking: 0.722 / 0.634). The older ``init="scaled"`` moved a BN magnitude into the
  compactor instead (0.872 / 0.833: within noise of the prior); it rescales the BN affine by the
  magnitude, so its effective learning rate differs per channel, and a scratch run with the same
  mask and frozen compactors trained worse with it (0.826 vs 0.834 at 0.2). It cannot be combined
  with the prior;
* ``train_share=1``: the whole budget trains with compactors under one learning-rate schedule and
  the folded model needs no fine-tune (as in the paper); 0.75 followed by a restarted 1-epoch
  fine-tune: 0.866 / 0.817 (2.5 points lost at 0.2, beyond two standard errors);
* ``restat``: after training, BN statistics are re-estimated for the model this run returns
  (masked rows zero), and the BNs the fold rewrites get measured statistics with their eval
  function kept (:func:`autoprune.engine.calibrate.restat_bn`). Without it the engine's BN recalibration
  replaces the fold's assumed variances and changes the function (a test ResNet-20's outputs by
  37 %; on the benchmark 0.869 / 0.839, within noise);
* ``compactor_momentum=0.9``: the paper's 0.99 averages over ~100 steps, longer than a trial
  (0.862 / 0.835, within noise).

With 48 steps the best schedule commits the mask almost at once (``reach`` 0.02, ``forget_by``
0.05, against 0.863 / 0.828 for 0.2 / 0.4), so by default ResRep here is the L1 mask
trained in compactor form and folded exactly; ``reach`` and ``forget_by`` give the ranking time
to learn when trials are long, and the search spaces search ``forget_by``.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.calibrate import kept_bn_statistics, recalibrate_bn, restat_bn
from ..errors import AutopruneError, SpecError
from ..train import Callbacks, TrainConfig, default_param_groups, lr_schedule, steps_per_epoch
from .base import MethodOutput, PruneContext, PruningMethod, Training
from .compactor import Compactors, find_sites
from .resrep_schedule import Mask, MaskSchedule, rank_scores

log = logging.getLogger(__name__)

NORMALISATIONS = ("raw", "group", "mac")
INITS = ("identity", "scaled")
PRIORS = ("none", "l1")


@dataclass(frozen=True)
class ResRepParams:
    # Defaults: penalty, growth and interval are the paper's. warmup / reach / forget_by / prior /
    # train_share / restat / compactor_momentum were chosen for short trials on the Fashion-MNIST
    # quality benchmark (ResNet-20, 3 epochs of 16 steps, 3 seeds; the module docstring gives the
    # numbers and results/benchmarks/quality_fashionmnist_ablation_resrep.md the table).
    penalty: float = 1e-4  # lambda, the group-lasso strength on compactor rows
    mask_interval: int = 200  # steps between mask updates (paper: 200); capped in short trials
    growth: int = 4  # channels added to the mask per update at least (paper: 4); raised in short trials
    warmup: float = 0.0  # fraction of the training steps before the first mask
    reach: float = 0.02  # fraction of the training steps by which the mask meets the target
    forget_by: float = 0.05  # masked rows are driven to zero by this fraction of the steps; 0: penalty only
    init: str = "identity"  # compactor rows start at 1 (paper) or at their channel's BN magnitude ("scaled")
    normalise: str = "raw"  # ranking: raw row norms, "group" (divided by the group's mean), "mac"
    compactor_momentum: float = 0.9  # SGD momentum of compactors (paper: 0.99); no weight decay
    residual: bool = True  # prune residual-coupled groups too (one mask shared by their compactors)
    train_share: float = 1.0  # share of a trial's epochs spent training with compactors (paper: all)
    prior: str = "l1"  # ranking: row norm times the channel's starting group-L1 magnitude; "none": norm only
    restat: bool = True  # measured BN statistics for the returned model (before the fold and after it)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise SpecError(f"resrep init {self.init!r} is unknown; use one of {', '.join(INITS)}")
        if self.prior not in PRIORS:
            raise SpecError(f"resrep prior {self.prior!r} is unknown; use one of {', '.join(PRIORS)}")
        if self.init == "scaled" and self.prior != "none":
            raise SpecError(f"resrep init 'scaled' already ranks channels by magnitude; set prior: none with it "
                            f"(got prior {self.prior!r})")
        if self.normalise not in NORMALISATIONS:
            raise SpecError(f"resrep normalise {self.normalise!r} is unknown; "
                            f"use one of {', '.join(NORMALISATIONS)}")
        checks = {"penalty": self.penalty >= 0, "mask_interval": self.mask_interval >= 1,
                  "growth": self.growth >= 1, "warmup": 0 <= self.warmup < 1,
                  "reach": self.warmup <= self.reach <= 1, "forget_by": 0 <= self.forget_by <= 1,
                  "compactor_momentum": 0 <= self.compactor_momentum < 1,
                  "train_share": 0 < self.train_share <= 1}
        for name, ok in checks.items():
            if not ok:
                raise SpecError(f"resrep parameter {name}={getattr(self, name)!r} is out of range "
                                "(penalty >= 0, mask_interval and growth >= 1, 0 <= warmup <= reach <= 1, "
                                "forget_by in [0, 1], compactor_momentum in [0, 1), train_share in (0, 1])")


def _prior(ctx: PruneContext, how: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Per group, each channel's starting magnitude relative to its group's mean ({} for ``none``)."""
    if how == "none":
        return {}
    from .l1 import L1

    scores = L1().scores(ctx, None)
    return {n: (scores[n] / scores[n].mean().clamp_min(1e-12)).clamp_min(1e-6) for n in names}


class _Run:
    """One ResRep run on the engine's training loop: compactors, the mask schedule, the hooks."""

    def __init__(self, ctx: PruneContext, params: ResRepParams) -> None:
        if ctx.data is None:
            raise AutopruneError("method 'resrep' trains while pruning: pass data= (a Dataset from "
                                 "autoprune.data.datasets.load_data) to prune()")
        self.ctx, self.params = ctx, params
        self.cfg = cfg = ctx.train_cfg if ctx.train_cfg is not None else TrainConfig()
        sites, self.skipped = find_sites(ctx.model, ctx.groups, ctx.input_shape, residual=params.residual)
        if not sites:
            why = "; ".join(self.skipped.values())
            raise AutopruneError(f"resrep found no channel group it can attach compactors to ({why})")
        self.groups = [g for g in ctx.prunable if g.name in sites]
        spe = steps_per_epoch(len(ctx.data.train), cfg.batch_size)
        self.steps = cfg.epochs * spe
        self.prior = _prior(ctx, params.prior, [g.name for g in self.groups])  # before compactors move a scale
        start = {g.name: self.prior.get(g.name, torch.ones(g.channels, dtype=torch.float64)) for g in self.groups}
        weighed = self._weigh(start)  # a latency target closed on measurement: aimed once, from the start scores
        aim = ctx.aim(weighed if ctx.allocation.mode == "global" else None, self.groups)
        self.schedule = MaskSchedule(self.groups, ctx.target_cost, aim, self.steps, params, ctx.allocation, weighed)
        lr_at = lr_schedule(cfg, spe)
        self.lrs = [lr_at(t) for t in range(self.steps)]
        self.forget = self.schedule.forget_fractions(self.lrs) if params.forget_by > 0 else None
        # fit's optimizer is SGD with Nesterov momentum when cfg.momentum > 0 (see autoprune.train)
        self.comp = Compactors(ctx.model, sites, momentum=params.compactor_momentum, nesterov=cfg.momentum > 0,
                               scaled=params.init == "scaled")
        self.final = False  # the mask can no longer change: not recomputed

    def _weigh(self, norms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weighted = {g: n * self.prior[g] for g, n in norms.items()} if self.prior else norms
        return rank_scores(weighted, self.params.normalise, self.ctx.target_cost,
                           {g.name: g.channels for g in self.groups})

    def ranking(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Compactor row norms per group, and the scores the allocator ranks (one host sync)."""
        norms = self.comp.group_norms()
        return norms, self._weigh(norms)

    def callbacks(self) -> Callbacks:
        return Callbacks(param_groups=self.param_groups, on_optimizer=self.comp.attach_optimizer,
                         after_backward=self.after_backward, reading=self.reading)

    def after_backward(self, _model: nn.Module, step: int) -> None:
        if not self.final and self.schedule.due(step):
            self.comp.set_masks(self.schedule.update(self.ranking()[1], step))
        self.final = self.final or self.schedule.final_after(step)
        t = min(step, self.steps - 1)
        self.comp.apply_penalty(self.params.penalty, self.lrs[t], self.forget[t] if self.forget is not None else None)

    def param_groups(self, model: nn.Module) -> list[dict]:
        own = {id(p) for p in self.comp.parameters()}
        out = []
        for g in default_param_groups(model, self.cfg.weight_decay):
            rest = [p for p in g["params"] if id(p) not in own]
            if rest:
                out.append({**g, "params": rest})
        out.append({"params": self.comp.parameters(), "weight_decay": 0.0,
                    "momentum": self.params.compactor_momentum})
        return out

    @contextlib.contextmanager
    def reading(self) -> Iterator[dict]:
        """The model this run would return if it stopped now: the final mask of this point applied
        (what folding and cutting compute) and BN statistics re-estimated as at the end; yields its
        MACs and parameters. Everything is restored on exit."""
        masked = self.schedule.final(self.ranking()[1])
        now = {n: set(cs) for n, cs in self.comp.masked_channels.items()}
        self.comp.set_masks(masked)
        try:
            with self.comp.masked(), kept_bn_statistics(self.ctx.model):
                recalibrate_bn(self.ctx.model, self.ctx.data.train, device=self.ctx.device, seed=self.cfg.seed)
                widths = {g.name: g.channels - len(masked[g.name]) for g in self.groups}
                yield {"macs": self.ctx.cost.macs(widths), "params": self.ctx.cost.params(widths)}
        finally:
            self.comp.set_masks(now)

    def finish(self) -> tuple[Mask, dict[str, torch.Tensor], int]:
        """Fold the model this run returns (masked rows zero even if not yet decayed), with measured
        BN statistics (``restat``); the final mask, the row norms, the images restat read."""
        norms, scores = self.ranking()
        masked = self.schedule.final(scores)
        self.comp.set_masks(masked)
        images = 0
        try:
            with self.comp.masked():
                if self.params.restat and self.steps:
                    images = recalibrate_bn(self.ctx.model, self.ctx.data.train, device=self.ctx.device,
                                            seed=self.cfg.seed)
                folded = self.comp.fold()
            if self.params.restat and self.steps:
                restat_bn(self.ctx.model, folded, self.ctx.data.train, device=self.ctx.device, seed=self.cfg.seed)
        finally:
            self.comp.remove()
        return masked, norms, images

    def info(self, keep: dict[str, tuple[int, ...]], masked: Mask, norms: dict[str, torch.Tensor],
             images: int) -> dict[str, Any]:
        residual = [g for g in self.ctx.prunable if g.residual]
        residual_pruned = any(g.residual for g in self.groups)
        sched = self.schedule
        info: dict[str, Any] = {
            "masked_norm_max": max((float(norms[n][c]) for n, cs in masked.items() for c in cs), default=0.0),
            "groups_pruned": sum(1 for g in self.groups if len(keep[g.name]) < g.channels),
            "residual_groups": ("none in this model" if not residual else "pruned with shared masks"
                                if residual_pruned else "left unpruned"),
            "steps": self.steps,
            "mask_updates": sched.updates,
            # the values the short-trial schedule actually used (it caps the interval and raises the growth)
            "mask_interval": sched.interval,
            "mask_growth": sched.growth_used,
            "allocation": self.ctx.allocation.mode if sched.fixed is not None else
            ("global (the shared allocator over compactor norms"
             f"{' x prior' if self.prior else ''}, normalise={self.ctx.allocation.normalise})"),
            "target_met_step": sched.reached_at,
            # restat: training images its two BN passes read (independent of the engine's recalibrate_batches)
            "restat_images": images,
        }
        if self.skipped:
            info["unpruned_groups"] = dict(self.skipped)
        return info


class ResRep(PruningMethod[ResRepParams]):
    name = "resrep"
    Params = ResRepParams
    summary = "ResRep: compactors with penalty gradients and a mask schedule, folded at the end"
    notes = (
        ("mask_interval is a maximum and growth a minimum: a short run caps the interval so the mask is "
        "updated about 8 times before `reach` and raises the growth to meet the target by then; "
        "info.mask_interval and info.mask_growth (metrics.json) record the values used"),
        ("allocation: global = the shared allocator ranks compactor norms (times the prior; `normalise` "
        "weighs them first, then the allocation's own normalise and round_to apply); uniform and "
        "searched fix each group's width from the allocation shape and the norms pick the channels; "
        "info.allocation records which"),
        ("penalty: with forget_by > 0 masked rows reach zero on forget_by's schedule, so in a run of a few "
        "epochs penalty only pulls unmasked rows (no change from 1e-5 to 1e-2 on digits, worse at 1e-2 on "
        "Fashion-MNIST): search forget_by, reach, prior or train_share instead"),
    )

    def training_epochs(self, params: ResRepParams, total_epochs: int) -> int:
        if total_epochs < 1:
            return 0
        return max(1, min(total_epochs, math.floor(params.train_share * total_epochs + 0.5)))

    def scores(self, ctx: PruneContext, params: ResRepParams) -> dict[str, torch.Tensor]:
        """Before training: the prior (or ones with ``prior="none"``), what the first mask ranks."""
        prior = _prior(ctx, params.prior, [g.name for g in ctx.prunable])
        return {g.name: prior.get(g.name, torch.ones(g.channels, dtype=torch.float64)) for g in ctx.prunable}

    def prepare(self, ctx: PruneContext, params: ResRepParams) -> Training:
        run = _Run(ctx, params)
        if not run.steps:
            log.warning("resrep got no training steps; the mask comes from the untrained compactors")
        return Training(callbacks=run.callbacks(), state=run, steps=run.steps)

    def finalize(self, ctx: PruneContext, params: ResRepParams, training: Training | None) -> MethodOutput:
        run = (training if training is not None else self.prepare(ctx, params)).state
        assert isinstance(run, _Run)
        masked, norms, images = run.finish()
        keep = {g.name: tuple(c for c in range(g.channels) if c not in masked[g.name]) for g in run.groups}
        return MethodOutput(keep=keep, model=ctx.model, info=run.info(keep, masked, norms, images))
