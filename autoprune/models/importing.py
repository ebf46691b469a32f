"""Bring your own trained model: turn it into a base checkpoint a search can start from.

A base checkpoint is ``model spec + state_dict + data spec + split hash + metrics`` (see
:mod:`autoprune.engine.plan`): the spec must rebuild the architecture, so a model comes as a name
(``torchvision:<name>``, ``package.module:function`` or a registry name) plus its weights: torchvision's
pretrained weights (downloaded by torchvision), a state_dict file, or an in-memory ``nn.Module`` of
that architecture. The model's validation accuracy on the chosen data is measured once and stored,
together with the hash of that data's split (:mod:`autoprune.data.splits`).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datasets import DataSpec, load_data
from ..data.splits import check_split
from ..engine.cost import count_macs, count_params
from ..engine.plan import BASE_FORMAT, load_base, read_checkpoint, save_base, with_metadata
from ..errors import AutopruneError, CheckpointError
from ..progress import phase
from ..train import evaluate
from ..trust import TrustCode, accepts_trust_code, check_name, needs_trust
from .outputs import logits_of, select_logits
from .registry import TORCHVISION_PREFIX, ModelSpec, create_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_model` wrote: the checkpoint, its spec and what was measured (val accuracy as
    a fraction in [0, 1]; MACs and parameters per sample, MACs = multiply-accumulates)."""

    path: Path
    spec: ModelSpec
    val_acc: float
    macs: int
    params: int
    split_hash: str


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file saved with ``torch.save(model.state_dict(), path)``, loaded safely.

    Also accepts ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and strips the ``module.``
    prefix of ``nn.DataParallel``. Raises ``CheckpointError`` for a missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"state_dict file {path} does not exist; save one with "
                              "torch.save(model.state_dict(), path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"state_dict file {path} cannot be loaded safely ({type(exc).__name__}); save "
                              "only tensors: torch.save(model.state_dict(), path)") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state_dict (a dict of tensors); save one with "
                              "torch.save(model.state_dict(), path)")
    prefix = "module."
    meta = getattr(obj, "_metadata", None)
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
        meta = {k.removeprefix(prefix): v for k, v in (meta or {}).items()}
    return with_metadata(obj, None, meta) if meta else dict(obj)


def _torchvision_weights(name: str, weights: str) -> dict[str, torch.Tensor]:
    import torchvision

    tv_name = name[len(TORCHVISION_PREFIX):]
    try:
        enum = torchvision.models.get_model_weights(tv_name)
        chosen = getattr(enum, weights) if weights == "DEFAULT" else enum[weights]
    except (KeyError, AttributeError, ValueError) as exc:
        known = ", ".join(["DEFAULT", *(w.name for w in torchvision.models.get_model_weights(tv_name))]) \
            if tv_name in torchvision.models.list_models() else "none"
        raise AutopruneError(f"torchvision model {tv_name!r} has no weights {weights!r}; known: {known}") from exc
    try:
        return chosen.get_state_dict(progress=False)
    except Exception as exc:  # URLError, checksum errors, no network
        raise AutopruneError(f"could not download {chosen} ({type(exc).__name__}); download it on a machine "
                             "with network access, torch.save its state_dict and pass it as the state_dict") from exc


def _fit_weights(model: nn.Module, state: Mapping[str, torch.Tensor], label: str) -> None:
    try:
        model.load_state_dict(with_metadata(state, model), strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = " ".join(str(exc).split())[:240]
        raise CheckpointError(f"{label}: weights do not fit the architecture ({first}); the model must be built "
                              "for the data's classes and channels") from exc


@accepts_trust_code
def import_model(
    source: str | nn.Module,
    data: DataSpec | Any,
    out: str | Path,
    *,
    name: str | None = None,
    state_dict: str | Path | Mapping[str, torch.Tensor] | None = None,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    output: int | str | None = None,
    trust_code: TrustCode = None,
) -> ImportResult:
    """Save a trained model as a base checkpoint at ``out`` after measuring its val accuracy on ``data``.

    ``source`` is a model name (``torchvision:<name>``, ``package.module:function``, a registry name)
    or an ``nn.Module``; for a module, ``name`` names the factory that rebuilds its architecture (the
    rebuilt model must reproduce the module's outputs). Weights come from ``state_dict`` (a path or a
    mapping), ``weights`` (torchvision's pretrained weights, e.g. ``"DEFAULT"``; downloaded), or the
    module itself. ``data`` is a :class:`DataSpec` or a loaded Dataset; the model is built for its
    classes, channels and image size. Raises ``AutopruneError`` for a missing source of weights, weights
    that do not fit, or a model whose outputs differ from the data's classes. ``output`` picks which
    output is the logits when forward returns several (:mod:`autoprune.models.outputs`). ``trust_code``: modules a
    ``package.module:function`` name may import (:mod:`autoprune.trust`).
    """
    named = name if isinstance(source, nn.Module) else source
    if isinstance(named, str) and needs_trust(named):
        check_name(named)  # an untrusted module is refused before anything else
    if isinstance(state_dict, (str, Path)) and not Path(state_dict).is_file():
        read_state_dict(state_dict)  # a missing file: its one-line error before the data is loaded
    with phase("load data"):
        dataset = load_data(data, device) if isinstance(data, DataSpec) else data
    module = source if isinstance(source, nn.Module) else None
    spec_name = name if module is not None else source
    if not isinstance(spec_name, str) or not spec_name:
        raise AutopruneError("importing an nn.Module needs name='package.module:function' (or torchvision:<name>) "
                             "that builds its architecture, so the checkpoint can rebuild it")
    spec = ModelSpec(spec_name, dataset.num_classes, dataset.in_channels, dataset.image_size, output)
    model = create_model(spec)
    if weights is not None:
        if not spec_name.startswith(TORCHVISION_PREFIX):
            raise AutopruneError(f"weights={weights!r} is for torchvision models; give {spec_name!r} a state_dict")
        state, label = _torchvision_weights(spec_name, weights), f"{spec_name} weights {weights}"
    elif state_dict is not None:
        state = read_state_dict(state_dict) if isinstance(state_dict, (str, Path)) else dict(state_dict)
        label = f"state_dict {state_dict if isinstance(state_dict, (str, Path)) else '(mapping)'}"
    elif module is not None:
        state, label = module.state_dict(), f"the given {type(module).__name__}"
    else:
        raise AutopruneError(f"no weights for {spec_name}: give a state_dict file, or torchvision weights "
                             "(e.g. DEFAULT); a randomly initialised model is trained with `autoprune train`")
    _fit_weights(model, state, label)
    model = model.to(device).eval()
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        out_rebuilt = logits_of(model, model(x))
        if module is not None:
            was_training = module.training
            given = select_logits(module.to(device).eval()(x), spec.output)
            module.train(was_training)
            if not torch.allclose(given, out_rebuilt, rtol=1e-5, atol=1e-6):
                raise AutopruneError(f"{spec_name} does not rebuild the given {type(module).__name__}: same weights, "
                                     "different outputs; name the factory that builds exactly this model")
    if out_rebuilt.shape[-1] != dataset.num_classes:
        raise AutopruneError(f"{spec_name} gives {out_rebuilt.shape[-1]} outputs but data {dataset.spec.name!r} has "
                             f"{dataset.num_classes} classes; replace the model's head for these classes and "
                             "train it first")
    return _save(out, model, spec, dataset, device, {"source": spec_name, "weights": label})


def restamp(checkpoint: str | Path, data: DataSpec | Any, out: str | Path, *, allow_split_mismatch: bool = False,
            device: str | torch.device = "cpu") -> ImportResult:
    """Re-measure an autoprune base checkpoint on ``data`` and save it with that data's spec and split.

    If the checkpoint was made on another split, this raises ``AutopruneError`` unless
    ``allow_split_mismatch`` (the user states the base never saw the new validation/test images).
    """
    ckpt = read_checkpoint(checkpoint)
    if ckpt["format"] != BASE_FORMAT:
        raise AutopruneError(f"{checkpoint} is a pruned model; import its base model instead")
    dataset = load_data(data, device) if isinstance(data, DataSpec) else data
    check_split(ckpt, dataset, str(checkpoint), allow_mismatch=allow_split_mismatch)
    model, _ = load_base(checkpoint, device)
    spec = ModelSpec.from_dict(ckpt["model"])
    if (spec.num_classes, spec.in_channels, spec.image_size) != (dataset.num_classes, dataset.in_channels,
                                                                  dataset.image_size):
        raise AutopruneError(f"{checkpoint} holds {spec}, which does not fit data {dataset.spec.name!r} "
                             f"({dataset.num_classes} classes, {dataset.in_channels}x{dataset.image_size}px)")
    extra = {"source": str(checkpoint), "previous_split": ckpt.get("split_hash"),
             "previous_data": ckpt.get("data"), "split_mismatch_allowed": bool(allow_split_mismatch)}
    return _save(out, model, spec, dataset, device, extra)


def _save(out: str | Path, model: nn.Module, spec: ModelSpec, dataset: Any, device: str | torch.device,
          extra: Mapping[str, Any]) -> ImportResult:
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    with phase(f"validation accuracy ({len(dataset.val)} images)"):
        val = evaluate(model, dataset.val, device)
    metrics = {"val_acc": val["acc"], "val_loss": val["loss"], "macs": count_macs(model, shape, device),
               "params": count_params(model), "imported": dict(extra)}
    path = Path(out)
    save_base(path, model, spec, dataset, metrics)
    log.info("imported %s: val_acc %.4f on %s (split %s) -> %s", spec.name, val["acc"], dataset.spec.name,
             dataset.split_hash, path)
    return ImportResult(path, spec, float(val["acc"]), int(metrics["macs"]), int(metrics["params"]),
                        dataset.split_hash)
