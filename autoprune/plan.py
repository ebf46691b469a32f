"""Plans (kept channels per group) and safe checkpoints of base and pruned models.

A checkpoint is a dict of plain types and tensors, loadable with ``torch.load(weights_only=True)``:
``{"format", "model" (ModelSpec), "data" (DataSpec), "plan" (pruned only), "state_dict", "metrics"}``.
A pruned model is rebuilt by creating the base architecture, applying the Plan, and loading the
state dict: no pickled modules, so files survive refactors and cannot run code when loaded.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AutopruneError, CheckpointError
from .graph import ChannelGroup, find_groups, remove_channels
from .models import ModelSpec, create_model

log = logging.getLogger(__name__)

BASE_FORMAT = "autoprune.base/1"
PRUNED_FORMAT = "autoprune.pruned/1"


@dataclass(frozen=True)
class Plan:
    """For each pruned channel group, the kept channel indices (sorted); absent groups keep all."""

    keep: Mapping[str, tuple[int, ...]]
    channels: Mapping[str, int] = field(default_factory=dict)  # original widths, to detect a mismatch

    def widths(self) -> dict[str, int]:
        return {name: len(kept) for name, kept in self.keep.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"keep": {k: list(v) for k, v in self.keep.items()}, "channels": dict(self.channels)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        try:
            keep = {str(k): tuple(int(i) for i in v) for k, v in d["keep"].items()}
            channels = {str(k): int(v) for k, v in d.get("channels", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"malformed plan ({exc}); expected {{'keep': {{group: [indices]}}}}") from exc
        return cls(keep=keep, channels=channels)

    @classmethod
    def from_keep(cls, keep: Mapping[str, tuple[int, ...]], groups: list[ChannelGroup]) -> Plan:
        by_name = {g.name: g for g in groups}
        pruned = {k: tuple(sorted(v)) for k, v in keep.items() if len(v) < by_name[k].channels}
        return cls(keep=pruned, channels={k: by_name[k].channels for k in pruned})


def apply_plan(model: nn.Module, groups: list[ChannelGroup], plan: Plan) -> nn.Module:
    """Physically remove the channels ``plan`` drops, in place; returns ``model``."""
    by_name = {g.name: g for g in groups}
    for name, n in plan.channels.items():
        if name not in by_name:
            raise AutopruneError(f"plan names channel group {name!r}, which this model does not have; "
                                 "was the plan made for another architecture?")
        if by_name[name].channels != n:
            raise AutopruneError(f"plan expects {n} channels in group {name!r}, the model has "
                                 f"{by_name[name].channels}; was the plan made for another architecture?")
    remove_channels(model, groups, plan.keep)
    return model


def _save(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_base(path: str | Path, model: nn.Module, spec: ModelSpec, data: Any = None,
              metrics: Mapping[str, Any] | None = None) -> None:
    """Save a base (unpruned) model: spec + state_dict + data spec + metrics."""
    _save(path, {"format": BASE_FORMAT, "model": spec.to_dict(), "data": _data_dict(data),
                 "state_dict": _state(model), "metrics": dict(metrics or {})})


def save_pruned(path: str | Path, model: nn.Module, spec: ModelSpec, plan: Plan, data: Any = None,
                metrics: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> None:
    """Save a pruned model as base spec + Plan + state_dict (+ data spec, metrics, extra info)."""
    _save(path, {"format": PRUNED_FORMAT, "model": spec.to_dict(), "data": _data_dict(data),
                 "plan": plan.to_dict(), "state_dict": _state(model), "metrics": dict(metrics or {}),
                 "extra": dict(extra or {})})


def _data_dict(data: Any) -> dict[str, Any] | None:
    if data is None or isinstance(data, dict):
        return data
    return data.to_dict()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict safely; missing, corrupt or foreign files raise ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `autoprune train --out {path}`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file "
                              f"({type(exc).__name__}); re-create it") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (BASE_FORMAT, PRUNED_FORMAT):
        raise CheckpointError(f"{path} is not an autoprune checkpoint (no 'format' key); autoprune saves "
                              "models with `autoprune train` / `autoprune prune`")
    return ckpt


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    modules = dict(model.named_modules())
    for key, value in state.items():  # compensation may have given a bias-free conv a bias
        owner, _, attr = key.rpartition(".")
        module = modules.get(owner)
        if attr == "bias" and isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(value))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise CheckpointError(f"{path}: weights do not fit the architecture ({first})") from exc


def load_base(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a base model (or a pruned one) from a checkpoint; returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    if ckpt["format"] == PRUNED_FORMAT:
        return load_pruned(path, device)
    spec = ModelSpec.from_dict(ckpt["model"])
    model = create_model(spec)
    _load_state(model, ckpt["state_dict"], Path(path))
    return model.to(device).eval(), ckpt


def load_pruned(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a pruned model: base architecture -> apply its Plan -> load its state_dict."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if ckpt["format"] != PRUNED_FORMAT:
        raise CheckpointError(f"{path} holds a base model, not a pruned one; use load_base")
    spec = ModelSpec.from_dict(ckpt["model"])
    model = create_model(spec).eval()
    plan = Plan.from_dict(ckpt["plan"])
    groups = find_groups(model, (spec.in_channels, spec.image_size, spec.image_size), check=False)
    apply_plan(model, groups, plan)
    _load_state(model, ckpt["state_dict"], path)
    return model.to(device).eval(), ckpt
