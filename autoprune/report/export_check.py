"""Reading and checking an exported file (written by :mod:`autoprune.report.export`): which exporter
wrote it, the input recipe it carries, and how closely it reproduces the PyTorch model's logits."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.preprocess import InputRecipe
from ..errors import AutopruneError
from ..models.outputs import logits_of
from .export import (
    DEFAULT_ATOL,
    EXPORTER_KEY,
    ExportCheck,
    check_format,
    cpu_copy,
    example_input,
    export_model,
)


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
    fmt = check_format(fmt or ("onnx" if path.suffix == ".onnx" else "torchscript"))
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
    fmt = check_format(format)
    path = Path(path)
    if not path.is_file():
        raise AutopruneError(f"exported file {path} does not exist; export it first (autoprune export)")
    ref = cpu_copy(model)
    try:
        run = _runner(path, fmt)
    except AutopruneError:
        raise
    except Exception as exc:
        raise AutopruneError(_runtime_refusal(path, fmt, exc, "loaded")) from exc
    worst = 0.0
    for i, batch in enumerate(batch_sizes):
        x = example_input(tuple(input_shape), batch, seed + i)
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
