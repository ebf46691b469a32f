"""Deployable files from a (pruned) model: ONNX and TorchScript (writing them; reading and checking them
against PyTorch: :mod:`autoprune.report.export_check`).

``export_model`` writes one file with a dynamic batch dimension; :func:`~.export_check.check_export` runs
it (ONNX with onnxruntime, TorchScript with ``torch.jit.load``) on random inputs at several batch sizes and
reports the largest absolute logit difference to PyTorch; :func:`~.export_check.export_checked` does both
and raises above the tolerance.

ONNX: the ``torch.export``-based exporter (the default since PyTorch 2.9) is tried first and the
legacy TorchScript-based one is the fallback (``exporter="auto"``); the file is self-contained
(weights inside, no external ``.data`` file), input ``input`` (N, C, H, W), output ``logits`` (the one
:mod:`autoprune.models.outputs` picks). TorchScript: ``torch.jit.trace`` by default (works for any model
whose forward has no data-dependent control flow), ``torch.jit.script`` on request.

With an :class:`autoprune.data.preprocess.InputRecipe` every export carries its preprocessing: in the
ONNX ``metadata_props`` / TorchScript extra files (keys ``autoprune.input.<field>``, JSON values)
and in ``<file>.json`` beside it (e.g. ``model.onnx.json``), so raw data can be fed to the file
with nothing but the file itself (:func:`~.export_check.read_recipe`).
"""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.preprocess import InputRecipe
from ..errors import AutopruneError
from ..files import clean_temps, write_bytes, write_json
from ..models.outputs import single_output

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".ts"}
ONNX_EXPORTERS = ("auto", "dynamo", "legacy")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_ATOL = 1e-4
OPSET = 18
EXPORTER_KEY = "autoprune.exporter"  # ONNX metadata / TorchScript extra file naming the exporter used


@dataclass(frozen=True)
class ExportCheck:
    """How closely an exported file reproduces the PyTorch model's logits."""

    path: Path
    format: str
    max_abs_diff: float  # largest |logit difference| over all checked batches
    batch_sizes: tuple[int, ...]
    atol: float
    exporter: str = ""  # onnx: "dynamo" | "legacy"; torchscript: "trace" | "script"

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.atol

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "format": self.format,
            "max_abs_diff": self.max_abs_diff,
            "batch_sizes": list(self.batch_sizes),
            "atol": self.atol,
            "ok": self.ok,
            "exporter": self.exporter,
        }


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise AutopruneError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    return fmt


def default_path(model_path: str | Path, fmt: str) -> Path:
    """``model.pt`` -> ``model.onnx`` / ``model.ts`` next to it."""
    return Path(model_path).with_suffix(SUFFIX[check_format(fmt)])


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of ``model``'s state (names, dtypes, shapes, values): the sidecar records it, so an export of
    the same weights may replace an earlier one (``autoprune export`` after ``retrain`` exported there)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def same_weights(export_path: str | Path, model: nn.Module) -> bool:
    """Whether ``export_path``'s sidecar says it was exported from exactly ``model``'s weights."""
    import json

    try:
        side = json.loads(sidecar_path(export_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(side, dict) and side.get("weights_sha256") == weights_fingerprint(model)


def sidecar_path(export_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the export's input recipe and names, for humans and tools."""
    p = Path(export_path)
    return p.with_name(p.name + ".json")


def cpu_copy(model: nn.Module) -> nn.Module:
    """An fp32, contiguous-format, eval-mode copy on the CPU (training leaves channels-last on CUDA)."""
    m = copy.deepcopy(model).to("cpu", dtype=torch.float32)
    m = m.to(memory_format=torch.contiguous_format)
    return m.eval()


def example_input(input_shape: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape, generator=g)


def export_model(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    path: str | Path,
    format: str = "onnx",
    exporter: str = "auto",
    opset: int = OPSET,
    recipe: InputRecipe | None = None,
) -> Path:
    """Write ``model`` (any device; exported from an fp32 CPU copy) to ``path`` as ``format``.

    ``input_shape`` is (C, H, W); the batch dimension stays dynamic. ``exporter`` picks the ONNX
    exporter ("auto": torch.export-based, falling back to the legacy one; or "torchscript":
    "trace"/"script"). ``recipe``: the input preprocessing, written into the file's metadata and
    into :func:`sidecar_path` (which is written even without a recipe, naming input and output).
    Returns the path written. The model is serialised in memory and written atomically with its
    sidecar (:mod:`autoprune.files`), so a failed export never leaves a broken file behind and a full
    disk or read-only folder is one line (``FileWriteError``), never a native writer's abort.
    """
    fmt = check_format(format)
    path = Path(path)
    example = example_input(tuple(input_shape), 2, 0)  # batch 2: batch 1 would be specialised by torch.export
    m = single_output(cpu_copy(model), example)
    meta = recipe.to_metadata() if recipe is not None else {}
    if fmt == "onnx":
        data, used = _export_onnx(m, example, exporter, opset)
        data = _set_onnx_metadata(data, {EXPORTER_KEY: used, **meta}, required=bool(meta), name=path.name)
    else:
        data, used = _export_torchscript(m, example, exporter, meta)
    if path.parent.is_dir():
        clean_temps(path.parent)  # what a killed export left
    side = {"file": path.name, "format": fmt, "exporter": used, "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME, "input_shape": ["batch", *input_shape],
            "input": recipe.to_dict() if recipe is not None else None, "weights_sha256": weights_fingerprint(model)}
    write_bytes(path, data)
    write_json(sidecar_path(path), side, indent=2)
    log.info("exported %s (%s, %s) -> %s", type(model).__name__, fmt, used, path)
    return path


def _export_onnx(model: nn.Module, example: torch.Tensor, exporter: str, opset: int) -> tuple[bytes, str]:
    """The serialised ONNX model (in memory) and the exporter that made it."""
    if exporter not in ONNX_EXPORTERS:
        raise AutopruneError(f"unknown ONNX exporter {exporter!r}; use one of: {', '.join(ONNX_EXPORTERS)}")
    errors = []
    for kind in ("dynamo", "legacy") if exporter == "auto" else (exporter,):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation chatter of the legacy path, tracer warnings
                if kind == "dynamo":
                    program = torch.onnx.export(
                        model,
                        (example,),
                        None,
                        dynamo=True,
                        external_data=False,
                        input_names=[INPUT_NAME],
                        output_names=[OUTPUT_NAME],
                        opset_version=opset,
                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                        verbose=False,
                    )
                    data = program.model_proto.SerializeToString()
                else:
                    buffer = io.BytesIO()
                    torch.onnx.export(
                        model,
                        (example,),
                        buffer,
                        dynamo=False,
                        input_names=[INPUT_NAME],
                        output_names=[OUTPUT_NAME],
                        opset_version=opset,
                        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    )
                    data = buffer.getvalue()
            return data, kind
        except ImportError as exc:
            errors.append(f"{kind}: {exc}")
        except Exception as exc:
            log.debug("ONNX %s export failed", kind, exc_info=True)
            errors.append(f"{kind}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    raise AutopruneError(
        f"ONNX export of {type(model).__name__} failed ({'; '.join(errors)}); "
        "try --format torchscript, or install onnx and onnxscript (pip install 'autoprune[export]')"
    )


def _set_onnx_metadata(data: bytes, meta: dict[str, str], required: bool, name: str) -> bytes:
    """``data`` (a serialised ONNX model) with ``meta`` in its metadata_props (replacing equal keys).

    Only the exporter's name is a nicety (``required`` False: failures are logged); an input
    recipe that cannot be written fails the export, which would otherwise be unusable on raw data.
    """
    try:
        import onnx

        proto = onnx.load_from_string(data)
        kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in meta]
        del proto.metadata_props[:]
        for key, value in [*kept, *meta.items()]:
            proto.metadata_props.add(key=key, value=value)
        return proto.SerializeToString()
    except ImportError as exc:
        if required:
            raise AutopruneError(f"could not write the input recipe into {name} ({exc}); install onnx "
                                 "(pip install 'autoprune[export]')") from exc
    except Exception as exc:
        if required:
            raise AutopruneError(f"could not write the input recipe into {name} ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:200]})") from exc
    log.debug("could not write ONNX metadata (onnx not installed or the model not parseable)")
    return data


def _export_torchscript(model: nn.Module, example: torch.Tensor, exporter: str,
                        meta: dict[str, str]) -> tuple[bytes, str]:
    """The TorchScript archive, saved through a buffer (torch's native file writer aborts the process
    on a full disk), and the exporter that made it."""
    kind = "trace" if exporter in ("auto", "trace") else exporter
    if kind not in ("trace", "script"):
        raise AutopruneError(f"unknown TorchScript exporter {exporter!r}; use trace or script")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; still works
            with torch.no_grad():
                module = (
                    torch.jit.trace(model, example, check_trace=False)
                    if kind == "trace"
                    else torch.jit.script(model)
                )
            buffer = io.BytesIO()
            torch.jit.save(module, buffer, _extra_files={EXPORTER_KEY: kind, **meta})
    except Exception as exc:
        raise AutopruneError(
            f"TorchScript {kind} of {type(model).__name__} failed "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            f"try --format onnx{' or script' if kind == 'trace' else ''}"
        ) from exc
    return buffer.getvalue(), kind
