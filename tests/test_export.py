"""export: ONNX (run with onnxruntime) and TorchScript files of pruned models reproduce the PyTorch
logits to 1e-4 at any batch size; a model saved to disk exports in a fresh process; the check fails
when the file and the model differ."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import model_input, randomise_bn

from autoprune import prune
from autoprune.cli import main
from autoprune.engine.plan import load_pruned, save_base, save_pruned
from autoprune.errors import AutopruneError
from autoprune.models.registry import create_model
from autoprune.report.export import default_path, export_model
from autoprune.report.export_check import check_export, export_checked, exporter_of

ort = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pruned_models():
    """Pruned small_cnn (digits-shaped 1x8x8) and CIFAR resnet20, with non-trivial BN statistics."""
    out = {}
    for name in ("small_cnn", "resnet20"):
        spec, shape = model_input(name)
        torch.manual_seed(0)
        base = randomise_bn(create_model(spec))
        res = prune(base, "l1", 0.5, spec=spec)
        assert res.macs < res.base_macs
        out[name] = (res, spec, shape)
    return out


def _onnx_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _reference(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


@pytest.mark.parametrize(
    "name,exporter", [("small_cnn", "auto"), ("small_cnn", "legacy"), ("resnet20", "auto")]
)
def test_onnx_export_reproduces_logits_with_onnxruntime(pruned_models, tmp_path, name, exporter):
    res, _, shape = pruned_models[name]
    path = export_model(res.model, shape, tmp_path / "m.onnx", "onnx", exporter=exporter)
    assert path.is_file() and not list(tmp_path.glob("*.data"))  # self-contained: no external weights
    assert exporter_of(path, "onnx") == ("dynamo" if exporter == "auto" else "legacy")
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        ref = _reference(res.model, x)
        got = _onnx_logits(path, x)
        assert got.shape == ref.shape == (batch, 10)
        assert np.abs(ref).max() > 1e-2  # logits are not trivially zero
        assert np.abs(got - ref).max() <= 1e-4
    check = check_export(res.model, path, "onnx", shape)
    assert check.ok and check.max_abs_diff <= 1e-4 and check.batch_sizes == (1, 3)


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_export_reproduces_logits(pruned_models, tmp_path, name, how):
    res, _, shape = pruned_models[name]
    check = export_checked(res.model, shape, tmp_path / "m.ts", "torchscript", exporter=how)
    assert check.ok and check.exporter == how
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
        loaded = torch.jit.load(str(tmp_path / "m.ts"))
    for batch in (1, 4):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            assert torch.allclose(loaded(x), res.model(x), atol=1e-4, rtol=0)


def test_check_fails_when_the_file_does_not_match_the_model(pruned_models, tmp_path):
    res, _, shape = pruned_models["small_cnn"]
    path = export_model(res.model, shape, tmp_path / "m.ts", "torchscript")
    other = copy.deepcopy(res.model)
    with torch.no_grad():
        other.classifier.bias.add_(0.01)
    check = check_export(other, path, "torchscript", shape)
    assert not check.ok and check.max_abs_diff == pytest.approx(0.01, rel=1e-3)


def test_bad_format_and_unreadable_file_are_autoprune_errors(pruned_models, tmp_path):
    res, _, shape = pruned_models["small_cnn"]
    with pytest.raises(AutopruneError, match="unknown export format 'tflite'.*onnx, torchscript"):
        export_model(res.model, shape, tmp_path / "m.tfl", "tflite")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(AutopruneError, match="could not be loaded as onnx"):
        check_export(res.model, junk, "onnx", shape)
    assert default_path("a/model.pt", "torchscript") == Path("a/model.ts")


def test_export_of_a_saved_pruned_model_in_a_fresh_process(pruned_models, tmp_path):
    res, spec, shape = pruned_models["resnet20"]
    model_file = tmp_path / "trial_0001.pt"
    save_pruned(model_file, res.model, spec, res.plan, None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoprune",
            "export",
            str(model_file),
            "--format",
            "onnx",
            "--exporter",
            "legacy",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == str(tmp_path / "trial_0001.onnx")
    diff = float(lines[1].split(":")[1].split()[0])
    assert diff <= 1e-4
    model, _ = load_pruned(model_file)  # the file on disk, rebuilt here, against the exported graph
    x = torch.randn(3, *shape)
    assert np.abs(_onnx_logits(Path(lines[0]), x) - _reference(model, x)).max() <= 1e-4


def test_cli_export_of_a_base_model_and_errors(tmp_path, capsys):
    spec, _ = model_input("small_cnn")
    base = randomise_bn(create_model(spec))
    save_base(tmp_path / "base.pt", base, spec, None, {})
    assert (
        main(
            ["export", str(tmp_path / "base.pt"), "--format", "torchscript", "--out", str(tmp_path / "b.ts")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.splitlines()[0] == str(tmp_path / "b.ts") and "max abs logit difference" in out
    assert (tmp_path / "b.ts").is_file()
    assert main(["export", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert "missing.pt does not exist" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(tmp_path / "base.pt"), "--format", "onnx", "--exporter", "trace"]) == 2
    assert "does not apply" in capsys.readouterr().err


def test_onnx_fed_raw_digits_with_only_its_metadata_recipe_reproduces_pytorch_test_accuracy(
        digits, digits_base, tmp_path):
    from sklearn.datasets import load_digits

    from autoprune.data.preprocess import recipe_for
    from autoprune.report.export import sidecar_path
    from autoprune.report.export_check import read_recipe
    from autoprune.train import evaluate

    model, _ = digits_base
    path = export_model(model, (1, 8, 8), tmp_path / "digits.onnx", "onnx", recipe=recipe_for(digits))
    torch_acc = evaluate(model, digits.test, "cpu")["acc"]
    raw = load_digits().images[digits.test.indices.numpy()]  # pixels 0..16, N x 8 x 8, as sklearn ships them
    y = digits.test.y.numpy()
    recipe = read_recipe(path)  # from the ONNX metadata_props alone
    assert recipe.scale == pytest.approx(1 / 16) and recipe.classes == tuple("0123456789")
    assert (recipe.layout, recipe.channels, recipe.height, recipe.width) == ("NCHW", 1, 8, 8)
    onnx_acc = float((_onnx_logits(path, torch.from_numpy(recipe.apply(raw))).argmax(1) == y).mean())
    assert torch_acc > 0.9 and onnx_acc == pytest.approx(torch_acc, abs=1e-12)
    # the recipe matters: mean/std without the 1/16 scale (what metrics.json used to give) fails
    unscaled = (raw[:, None] - np.asarray(recipe.mean)) / np.asarray(recipe.std)
    assert float((_onnx_logits(path, torch.from_numpy(unscaled.astype(np.float32))).argmax(1) == y).mean()) \
        < torch_acc - 0.1
    side = json.loads(sidecar_path(path).read_text())
    assert side["file"] == "digits.onnx" and side["input"]["std"] == list(recipe.std)
    assert side["input_name"] == "input" and side["output_name"] == "logits"


def test_torchscript_export_carries_the_recipe_too(digits, digits_base, tmp_path):
    from autoprune.data.preprocess import recipe_for
    from autoprune.report.export_check import read_recipe

    model, _ = digits_base
    path = export_model(model, (1, 8, 8), tmp_path / "digits.ts", "torchscript", recipe=recipe_for(digits))
    assert read_recipe(path) == recipe_for(digits)
    bare = export_model(model, (1, 8, 8), tmp_path / "bare.ts", "torchscript")
    with pytest.raises(AutopruneError, match="no autoprune input recipe"):
        read_recipe(bare)


def test_cli_export_refuses_to_overwrite_without_force_and_writes_the_recipe(digits, digits_base, tmp_path,
                                                                           capsys):
    from autoprune.report.export_check import read_recipe

    model, spec = digits_base
    save_base(tmp_path / "base.pt", model, spec, digits.spec, {})
    out = tmp_path / "base.onnx"
    assert main(["export", str(tmp_path / "base.pt"), "--exporter", "legacy"]) == 0
    assert "input recipe" in capsys.readouterr().out
    assert read_recipe(out).data == "digits" and (tmp_path / "base.onnx.json").is_file()
    stamp = out.stat().st_mtime_ns
    other = create_model(spec)  # other weights: their export must not replace this one silently
    save_base(tmp_path / "other.pt", other, spec, digits.spec, {})
    assert main(["export", str(tmp_path / "other.pt"), "--exporter", "legacy", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --force" in err and len(err.strip().splitlines()) == 1
    assert out.stat().st_mtime_ns == stamp
    # the same weights again (the README's `export` after `retrain` wrote there): rewritten, nothing lost
    assert main(["export", str(tmp_path / "base.pt"), "--exporter", "legacy"]) == 0
    assert "same weights" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "base.pt"), "--exporter", "legacy", "--force"]) == 0
