"""ResRep's compactors: where they go, how they are attached, the penalty rule, and the fold.

A compactor is an identity-initialised 1x1 convolution without bias that reads a channel group
right after its last normalisation ("conv -> BN -> compactor -> activation"). Training it with
ResRep's penalty gradients drives the rows of channels chosen for forgetting to zero; folding then
merges BN and compactor into the conv so that the model has the base architecture again and the
engine can delete the masked rows.

Compactors are attached with forward hooks on the existing modules plus an ``nn.ModuleDict``
stored on the model under :data:`ATTR`: module names of the base model never change, ``fit``
trains the compactors through ``model.parameters()``, and removing both restores the model.

Where a compactor goes (a *site*):

* a plain group (one leader conv, or several coupled by residual additions): one full C x C
  compactor after each leader's BN (after the conv itself when no BN reads it directly). The
  compactors of a residual group share one mask, so a masked channel is zero in every summand.
* a group tied through depthwise convs (MobileNet's expand -> BN -> act -> depthwise -> BN):
  one *diagonal* compactor (per-channel scale) after each depthwise conv's BN. A full compactor
  after the expand BN would not work: the depthwise BN behind it normalises with batch statistics,
  so in training a shrinking row is rescaled back and never disappears, and after deletion the
  depthwise BN's shift of the removed channel would be lost. A full compactor cannot be folded
  through a depthwise conv either, hence the diagonal one, which folds into the BN's affine.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.cost import is_depthwise
from ..engine.graph import ChannelGroup
from ..engine.trace import direct_bns

log = logging.getLogger(__name__)

ATTR = "resrep_compactors"  # the ModuleDict of compactors lives on the model under this name
EPS = 1e-8  # guards Q_i / ||Q_i|| for rows that have reached zero


@dataclass(frozen=True)
class Site:
    """One compactor: it reads the output of ``module`` (a BN, or ``conv`` itself when no BN follows)."""

    group: str
    module: str
    conv: str  # the conv whose output channels the compactor's rows are
    diagonal: bool  # per-channel scale (after a depthwise conv) instead of a full C x C 1x1 conv
    rows: tuple[int, ...]  # rows[c]: the compactor row of group channel c


def _rows(g: ChannelGroup, conv: str, out_channels: int) -> tuple[int, ...] | None:
    member = g.member(conv, "out")
    if member is None or any(len(ix) != 1 for ix in member.index):
        return None
    rows = tuple(ix[0] for ix in member.index)
    return rows if sorted(rows) == list(range(out_channels)) else None


def find_sites(
    model: nn.Module, groups: Sequence[ChannelGroup], input_shape: Sequence[int], residual: bool = True
) -> tuple[dict[str, list[Site]], dict[str, str]]:
    """Compactor sites per prunable group, and why the other prunable groups get none."""
    groups = [g for g in groups if g.prunable]
    facts = direct_bns(model, input_shape)
    follower, repeated = facts.bn_of, {n for n, k in facts.calls.items() if k > 1}
    modules = dict(model.named_modules())
    sites: dict[str, list[Site]] = {}
    skipped: dict[str, str] = {}
    for g in groups:
        if g.residual and not residual:
            skipped[g.name] = "residual group (residual=False)"
            continue
        convs = g.passthrough or g.leaders
        problem = ""
        found = []
        for conv in convs:
            m = modules[conv]
            ok_type = isinstance(m, nn.Conv2d) and is_depthwise(m) if g.passthrough else isinstance(m, nn.Conv2d) and m.groups == 1
            rows = _rows(g, conv, m.out_channels) if isinstance(m, nn.Conv2d) else None
            site = follower.get(conv, conv)
            bn = modules[site]
            if not ok_type:
                problem = f"{conv} is a {type(m).__name__} compactors cannot follow"
            elif rows is None or len(rows) != g.channels:
                problem = f"{conv}'s output channels do not map one-to-one onto the group"
            elif conv in repeated or site in repeated:
                problem = f"{site} is called more than once in forward"
            elif site != conv and not (bn.affine and bn.track_running_stats):
                problem = f"{site} has no affine parameters or running statistics to fold into"
            if problem:
                break
            found.append(Site(g.name, site, conv, bool(g.passthrough), rows))
        if problem:
            skipped[g.name] = problem
        else:
            sites[g.name] = found
    for name, why in skipped.items():
        log.info("resrep leaves group %s unpruned: %s", name, why)
    return sites, skipped


class Compactors:
    """The compactors of one model: attach, mask, penalise, measure, fold, remove."""

    def __init__(self, model: nn.Module, sites: Mapping[str, list[Site]], momentum: float = 0.0,
                 nesterov: bool = False, scaled: bool = False) -> None:
        self.model = model
        self.momentum, self.nesterov = momentum, nesterov  # used until an optimizer is attached
        self.optimizer: torch.optim.Optimizer | None = None
        self._any_masked: dict[str, bool] = {}  # host-side: no device sync to ask whether a row is masked
        self.masked_channels: dict[str, set[int]] = {}  # group -> masked channels (as last set)
        self.sites = [s for group_sites in sites.values() for s in group_sites]
        modules = dict(model.named_modules())
        self.layers = nn.ModuleDict()
        for s in self.sites:
            ref = modules[s.conv].weight
            c = len(s.rows)
            layer = nn.Conv2d(c, c, 1, groups=c if s.diagonal else 1, bias=False)
            layer.to(device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                if s.diagonal:
                    layer.weight.fill_(1.0)
                else:
                    layer.weight.copy_(torch.eye(c, device=ref.device, dtype=ref.dtype).view(c, c, 1, 1))
            self.layers[self._key(s)] = layer
        self.masks = {self._key(s): torch.ones(len(s.rows), device=self.layers[self._key(s)].weight.device)
                      for s in self.sites}
        if scaled:
            self._move_scale(modules)
        model.add_module(ATTR, self.layers)
        self._handles = [modules[s.module].register_forward_hook(self._hook(self.layers[self._key(s)]))
                         for s in self.sites]

    @torch.no_grad()
    def _move_scale(self, modules: Mapping[str, nn.Module]) -> None:
        """Start each row at its channel's relative magnitude instead of 1: move a per-channel scale
        a_i from the module the compactor reads (BN affine, or conv filter and bias) into row i.

        The magnitude is the RMS of the BN output (sqrt(gamma^2 + beta^2)) or the conv filter's L2
        norm, divided by its mean over the group, so rows of every group still average 1 and the
        global ranking compares channels within and across layers from the first step. The
        model's outputs do not change.
        """
        mags: dict[str, torch.Tensor] = {}
        for s in self.sites:
            m = modules[s.module]
            parts = [m.weight.reshape(m.weight.shape[0], -1)]
            if m.bias is not None:
                parts.append(m.bias.unsqueeze(1))
            mags[self._key(s)] = torch.cat(parts, 1).double().norm(dim=1)
        for group in {s.group for s in self.sites}:
            keys = [self._key(s) for s in self.sites if s.group == group]
            mean = torch.cat([mags[k] for k in keys]).mean().clamp_min(1e-12)
            for k in keys:
                mags[k] = (mags[k] / mean).clamp_min(1e-6)
        for s in self.sites:
            a = mags[self._key(s)]
            m, layer = modules[s.module], self.layers[self._key(s)]
            shape = (-1,) + (1,) * (m.weight.dim() - 1)
            m.weight.copy_((m.weight.double() / a.view(shape)).to(m.weight.dtype))
            if m.bias is not None:
                m.bias.copy_((m.bias.double() / a).to(m.bias.dtype))
            w = layer.weight.reshape(layer.weight.shape[0], -1)  # identity: the diagonal holds the ones
            w.copy_((w.double() * a.unsqueeze(1)).to(w.dtype))

    @staticmethod
    def _key(site: Site) -> str:
        return site.module.replace(".", "__")

    @staticmethod
    def _hook(layer: nn.Conv2d):
        def fn(_module: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
            return layer(out)
        return fn

    def parameters(self) -> list[nn.Parameter]:
        return list(self.layers.parameters())

    def weight(self, site: Site) -> torch.Tensor:
        w = self.layers[self._key(site)].weight
        return w.reshape(w.shape[0], -1)

    @torch.no_grad()
    def group_norms(self) -> dict[str, torch.Tensor]:
        """Per group channel: the root-mean-square of its row norms over the group's compactors."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for s in self.sites:
            norms = self.weight(s).float().norm(dim=1).double().cpu()[list(s.rows)]
            sums[s.group] = sums.get(s.group, 0) + norms.square()
            counts[s.group] = counts.get(s.group, 0) + 1
        return {g: (v / counts[g]).sqrt() for g, v in sums.items()}

    def set_masks(self, masked: Mapping[str, set[int]]) -> None:
        """Mask group channels: their rows get no task gradient in every compactor of the group."""
        self.masked_channels = {g: set(cs) for g, cs in masked.items()}
        for s in self.sites:
            mask = torch.ones(len(s.rows))
            for c in masked.get(s.group, ()):
                mask[s.rows[c]] = 0.0
            self.masks[self._key(s)] = mask.to(self.masks[self._key(s)].device)
            self._any_masked[self._key(s)] = bool(masked.get(s.group))

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Forced forgetting reads this optimizer's real momentum buffers and settings (SGD). A step a
        GradScaler skips leaves them untouched, so the next step's forced update stays exact."""
        self.optimizer = optimizer

    def _momentum_state(self, w: torch.nn.Parameter) -> tuple[float, bool, torch.Tensor | None]:
        """(momentum, nesterov, momentum buffer or None) that the optimizer will apply to ``w``."""
        if self.optimizer is None:
            if self.momentum > 0:
                raise ValueError("forced forgetting with momentum needs the optimizer's momentum buffers: "
                                 "call attach_optimizer() first")
            return 0.0, False, None
        group = next((g for g in self.optimizer.param_groups if any(p is w for p in g["params"])), None)
        if group is None:
            raise ValueError("the attached optimizer does not train this compactor")
        buf = self.optimizer.state.get(w, {}).get("momentum_buffer")
        return float(group.get("momentum", 0.0)), bool(group.get("nesterov", False)), buf

    @contextlib.contextmanager
    def masked(self) -> Iterator[None]:
        """Within the block the masked rows are zero: the model computes what folding and removing the
        masked channels would give (in eval mode). The rows are restored on exit."""
        saved = []
        with torch.no_grad():
            for s in self.sites:
                w = self.layers[self._key(s)].weight
                keep = self.masks[self._key(s)].to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
                saved.append((w, w.detach().clone()))
                w.mul_(keep)
        try:
            yield
        finally:
            with torch.no_grad():
                for w, old in saved:
                    w.copy_(old)

    @torch.no_grad()
    def apply_penalty(self, penalty: float, lr: float = 0.0, forget: float | None = None) -> None:
        """ResRep's gradient: g_i = m_i * dL/dQ_i + penalty * Q_i / ||Q_i||, per compactor row i.

        With ``forget`` (a fraction in (0, 1]), masked rows instead get the gradient that makes this
        step's SGD update (learning rate ``lr``; momentum, Nesterov and the momentum buffer read from
        the attached optimizer, see :meth:`attach_optimizer`) move them straight toward zero by
        ``forget`` of their current value. No host synchronisation: safe to call every step on a GPU.
        """
        for s in self.sites:
            key = self._key(s)
            w = self.layers[key].weight
            rows = w.reshape(w.shape[0], -1)
            keep = self.masks[key].to(w.dtype).unsqueeze(1)
            lasso = penalty * rows / rows.norm(dim=1, keepdim=True).clamp_min(EPS)
            task = w.grad.reshape_as(rows) if w.grad is not None else torch.zeros_like(rows)
            grad = keep * task + lasso
            if forget is not None and lr > 0 and self._any_masked.get(key, False):
                beta, nesterov, buf = self._momentum_state(w)
                buf = buf.reshape_as(rows) if buf is not None else None
                want = forget * rows / lr  # update / lr that takes the row there
                if beta == 0:
                    forced = want
                elif nesterov:  # update = g + beta * (beta * buf + g)
                    forced = (want - beta * beta * buf) / (1 + beta) if buf is not None else want / (1 + beta)
                else:  # update = beta * buf + g
                    forced = want - beta * buf if buf is not None else want
                grad = torch.where(keep == 0, forced, grad)
            w.grad = grad.reshape_as(w).to(w.dtype)

    @torch.no_grad()
    def fold(self) -> list[nn.Module]:
        """Merge every compactor (and the BN before it) into the conv/BN it follows; then remove them.

        The model keeps the base architecture and, in eval mode, computes what it computed with
        the compactors (to float rounding). Returns the BNs whose running statistics the fold set
        by assumption (:func:`_fold_bn`): give them measured ones with
        :func:`autoprune.engine.calibrate.restat_bn` before anything recalibrates or fine-tunes them.
        """
        modules = dict(self.model.named_modules())
        rewritten = []
        for s in self.sites:
            q = self.layers[self._key(s)].weight.detach().double().reshape(len(s.rows), -1)
            conv, site = modules[s.conv], modules[s.module]
            if s.diagonal:
                _fold_diagonal(site, q[:, 0])
            elif site is conv:
                _fold_conv(conv, q)
            else:
                _fold_bn(conv, site, q)
                rewritten.append(site)
        self.remove()
        return rewritten

    def remove(self) -> None:
        """Detach the compactors without folding (idempotent). Scales moved into the compactors
        (``scaled=True``) are not given back: use :meth:`fold` to keep the model's function."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if getattr(self.model, ATTR, None) is self.layers:
            delattr(self.model, ATTR)


def _fold_diagonal(module: nn.Module, q: torch.Tensor) -> None:
    """A per-channel scale after a BN (or a conv) folds into its affine weight and bias."""
    shape = (-1,) + (1,) * (module.weight.dim() - 1)
    module.weight.copy_((module.weight.double() * q.view(shape)).to(module.weight.dtype))
    if module.bias is not None:
        module.bias.copy_((module.bias.double() * q).to(module.bias.dtype))


def _fold_conv(conv: nn.Conv2d, q: torch.Tensor) -> None:
    """Compactor straight after a conv: K'' = Q K, b'' = Q b."""
    k = conv.weight.double()
    conv.weight.copy_((q @ k.reshape(k.shape[0], -1)).reshape(k.shape).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.copy_((q @ conv.bias.double()).to(conv.bias.dtype))


def _fold_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, q: torch.Tensor) -> None:
    """conv -> BN -> compactor becomes conv -> BN with the base architecture.

    BN into conv: K' = K * s, b' = beta + s * (b - mean) with s = gamma / sqrt(var + eps);
    compactor into conv: K'' = Q K', b'' = Q b'. K'' goes into the conv (its own bias, if any, is
    zeroed) and the BN is set to add b'' and otherwise pass its input through in eval mode.

    Choice of the BN's running statistics: any (mu, v) with weight = sqrt(v + eps) and
    bias = b'' + mu gives eval output K''x + b'' exactly. We pick the statistics the new channel
    should have, so that a later fine-tune in train mode (which normalises with batch statistics)
    starts from nearly the same function: the mean is exact given the old running statistics,
    mu_i = sum_j Q_ij s_j (mean_j - b_j); the variance assumes the old channels uncorrelated,
    v_i = sum_j Q_ij^2 s_j^2 var_j (kept rows of Q stay close to the identity's, so the cross
    terms it leaves out are small).
    """
    k = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else torch.zeros(k.shape[0], dtype=torch.float64,
                                                                      device=k.device)
    mean, var = bn.running_mean.double(), bn.running_var.double()
    s = bn.weight.double() / torch.sqrt(var + bn.eps)
    k1 = k * s.view(-1, 1, 1, 1)
    b1 = bn.bias.double() + s * (b - mean)
    k2 = (q @ k1.reshape(k1.shape[0], -1)).reshape(k.shape)
    b2 = q @ b1
    mu = q @ (s * (mean - b))
    v = q.square() @ (s.square() * var)
    conv.weight.copy_(k2.to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.zero_()
    bn.running_mean.copy_(mu.to(bn.running_mean.dtype))
    bn.running_var.copy_(v.to(bn.running_var.dtype))
    bn.weight.copy_(torch.sqrt(v + bn.eps).to(bn.weight.dtype))
    bn.bias.copy_((b2 + mu).to(bn.bias.dtype))
