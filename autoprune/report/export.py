"""Deployable files from a (pruned) model: ONNX and TorchScript, each checked against PyTorch.

``export_model`` writes one file with a dynamic batch dimension; ``check_export`` runs it (ONNX with
onnxruntime, TorchScript with ``torch.jit.load``) on random inputs at several batch sizes and reports the
largest absolute logit difference to PyTorch; ``export_checked`` does both and raises above the tolerance.

ONNX: the ``torch.export``-based exporter (the default since PyTorch 2.9) is tried first and the
legacy TorchScript-based one is the fallback (``exporter="auto"``); the file is self-contained
(weights inside, no external ``.data`` file), input ``input`` (N, C, H, W), output ``logits`` (the one
:mod:`autoprune.models.outputs` picks). TorchScript: ``torch.jit.trace`` by default (works for any model
whose forward has no data-dependent control flow), ``torch.jit.script`` on request.

With an :class:`autoprune.data.preprocess.InputRecipe` every export carries its preprocessing: in the
ONNX ``metadata_props`` / TorchScript extra files (keys ``autoprune.input.<field>``, JSON values)
and in ``<file>.json`` beside it (e.g. ``model.onnx.json``), so raw data can be fed to the file
with nothing but the file itself (:func:`read_recipe`).
"""

from __future__ import annotations

import copy
import io
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.preprocess import InputRecipe
from ..errors import AutopruneError
from ..files import clean_temps, write_bytes, write_json
from ..models.outputs import logits_of, single_output

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


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise AutopruneError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    return fmt


def default_path(model_path: str | Path, fmt: str) -> Path:
    """``model.pt`` -> ``model.onnx`` / ``model.ts`` next to it."""
    return Path(model_path).with_suffix(SUFFIX[_check_format(fmt)])


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


def _cpu_copy(model: nn.Module) -> nn.Module:
    """An fp32, contiguous-format, eval-mode copy on the CPU (training leaves channels-last on CUDA)."""
    m = copy.deepcopy(model).to("cpu", dtype=torch.float32)
    m = m.to(memory_format=torch.contiguous_format)
    return m.eval()


def _example(input_shape: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
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
    fmt = _check_format(format)
    path = Path(path)
    example = _example(tuple(input_shape), 2, 0)  # batch 2: batch 1 would be specialised by torch.export
    m = single_output(_cpu_copy(model), example)
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


def exporter_of(path: str | Path, fmt: str) -> str:
    """Which exporter wrote ``path`` ("dynamo" | "legacy" | "trace" | "script"; "" if unknown)."""
    try:
        if fmt == "onnx":
            import onnx

            proto = onnx.load(str(path), load_external_data=False)
            return {p.key: p.value for p in proto.metadata_props}.get(EXPORTER_KEY, "")
        extra = {EXPORTER_KEY: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        value = extra[EXPORTER_KEY]
        return value.decode() if isinstance(value, bytes) else str(value)
    except Exception:  # noqa: BLE001 - informational only
        return ""


def read_recipe(path: str | Path, fmt: str | None = None) -> InputRecipe:
    """The input recipe stored in an exported file itself (ONNX metadata or TorchScript extra files).

    ``fmt`` defaults from the suffix (.onnx / .ts). AutopruneError when the file has none.
    """
    path = Path(path)
    fmt = _check_format(fmt or ("onnx" if path.suffix == ".onnx" else "torchscript"))
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    else:
        from dataclasses import fields

        from ..data.preprocess import META_PREFIX

        extra = {META_PREFIX + f.name: "" for f in fields(InputRecipe)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        props = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in extra.items() if v}
    return InputRecipe.from_metadata(props)


def _runner(path: Path, fmt: str):
    """A callable numpy (N,C,H,W) float32 -> numpy logits, running the exported file."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise AutopruneError(
                "checking an ONNX export needs onnxruntime; pip install onnxruntime"
            ) from exc
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).float().numpy()

    return run


def _runtime_refusal(path: Path, fmt: str, exc: Exception, what: str) -> str:
    """Why the runtime could not take the graph; often half precision inside forward (re-exporting cannot help)."""
    text, runtime = " ".join(str(exc).split()), "onnxruntime" if fmt == "onnx" else "torch.jit"
    low = re.search(r"tensor\((bfloat16|float16)\)|\b(BFloat16|Half)\b", text)
    if low:
        dtype = low.group(1) or {"BFloat16": "bfloat16", "Half": "float16"}[low.group(2)]
        return (f"{path}: {runtime} cannot run this graph: it computes in {dtype} (the model changes precision "
                f"inside forward, e.g. torch.autocast or .half()) ({text[:240]}); export a model that computes in "
                f"float32 (drop the autocast from forward){' or use --format torchscript' if fmt == 'onnx' else ''}")
    if any(k in text for k in ("NOT_IMPLEMENTED", "INVALID_GRAPH", "Could not find an implementation")):
        return f"{path}: {runtime} cannot run this graph ({text[:300]}); try --exporter legacy|dynamo or torchscript"
    return f"{path} could not be {what} as {fmt} ({type(exc).__name__}: {text[:300]}); re-export it"


def check_export(
    model: nn.Module,
    path: str | Path,
    format: str,
    input_shape: tuple[int, int, int],
    batch_sizes: tuple[int, ...] = (1, 3),
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> ExportCheck:
    """Run the exported file and ``model`` (fp32, CPU) on the same random inputs; largest |logit diff|.

    Inputs are standard-normal, which is what standardised data looks like. Several batch sizes
    check that the batch dimension really is dynamic. A file that cannot be loaded or run raises
    :class:`AutopruneError`; a mismatch does not (see ``ExportCheck.ok``).
    """
    fmt = _check_format(format)
    path = Path(path)
    if not path.is_file():
        raise AutopruneError(f"exported file {path} does not exist; export it first (autoprune export)")
    ref = _cpu_copy(model)
    try:
        run = _runner(path, fmt)
    except AutopruneError:
        raise
    except Exception as exc:
        raise AutopruneError(_runtime_refusal(path, fmt, exc, "loaded")) from exc
    worst = 0.0
    for i, batch in enumerate(batch_sizes):
        x = _example(tuple(input_shape), batch, seed + i)
        with torch.no_grad():
            expected = logits_of(ref, ref(x)).float().numpy()  # float(): numpy has no bfloat16
        try:
            got = np.asarray(run(x.numpy()))
        except Exception as exc:
            raise AutopruneError(_runtime_refusal(path, fmt, exc, f"run on a batch of {batch}")) from exc
        if got.shape != expected.shape:
            raise AutopruneError(
                f"{path} returned logits of shape {got.shape} for a batch of {batch}, expected "
                f"{expected.shape}; re-export it"
            )
        diff = (
            float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if got.size else 0.0
        )
        worst = max(worst, diff) if math.isfinite(diff) else math.inf
    return ExportCheck(
        path=path,
        format=fmt,
        max_abs_diff=worst,
        batch_sizes=tuple(batch_sizes),
        atol=atol,
        exporter=exporter_of(path, fmt),
    )


def export_checked(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    path: str | Path,
    format: str = "onnx",
    exporter: str = "auto",
    atol: float = DEFAULT_ATOL,
    recipe: InputRecipe | None = None,
) -> ExportCheck:
    """``export_model`` then ``check_export``; AutopruneError if the logits differ by more than ``atol``."""
    written = export_model(model, input_shape, path, format, exporter, recipe=recipe)
    check = check_export(model, written, format, input_shape, atol=atol)
    if not check.ok:
        raise AutopruneError(
            f"{written}: exported {format} logits differ from PyTorch by {check.max_abs_diff:.3g} "
            f"(tolerance {atol:g}); try the other exporter or format"
        )
    return check
