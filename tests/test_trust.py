"""The trust boundary for code (issue 30, item 1): a checkpoint, a results folder or a spec that names
a ``package.module:function`` model never imports it unless the user trusts the module where autoprune
runs (``--trust-code``, ``AUTOPRUNE_TRUST_CODE``, ``trust_code=``). The crafted module writes a marker
file when imported; every command, in-process and under ``python -m autoprune``, must leave no marker."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from autoprune import trust
from autoprune.cli import main
from autoprune.engine.plan import load_base
from autoprune.models.registry import ModelSpec, create_model

pytestmark = pytest.mark.usefixtures("one_thread")

EVIL = "evilmod_trust"  # the module the crafted files name
MARKER_ENV = "AUTOPRUNE_TEST_MARKER"


def evil_source() -> str:
    return ("import os, pathlib\n"
            f"pathlib.Path(os.environ['{MARKER_ENV}']).write_text('code ran')\n"
            "from autoprune.models import zoo\n"
            "def build(num_classes, in_channels, image_size):\n"
            "    return zoo.SmallCNN(num_classes, in_channels, image_size)\n")


def rename_model(path: Path, name: str) -> None:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["model"]["name"] = name
    torch.save(ckpt, path)


@pytest.fixture(scope="module")
def crafted_study(base_ckpt, tmp_path_factory) -> Path:
    """A finished 1-trial search whose base.pt, models/*.pt and spec.yaml name ``evilmod_trust:build``,
    with ``evilmod_trust.py`` shipped inside the folder."""
    folder = tmp_path_factory.mktemp("trust")
    spec = {"study": "t", "model": "small_cnn", "data": "digits", "device": "cpu", "seed": 0, "base": str(base_ckpt),
            "budget": {"max_trials": 1}, "early_stop": {"enabled": False},
            "space": {"method": "l1", "target": 0.5, "allocation": "global", "epochs": 1, "lr": 0.01,
                      "batch_size": 256}}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = folder / "study"
    assert main(["search", str(folder / "spec.yaml"), "--out", str(out), "--no-progress"]) == 0
    for path in [out / "base.pt", *(out / "models").glob("*.pt")]:
        rename_model(path, f"{EVIL}:build")
    saved = yaml.safe_load((out / "spec.yaml").read_text())
    saved["model"] = f"{EVIL}:build"
    (out / "spec.yaml").write_text(yaml.safe_dump(saved))
    (out / f"{EVIL}.py").write_text(evil_source())
    return out


@pytest.fixture
def armed(crafted_study, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A fresh copy of the crafted study, the evil module importable (so only the trust check can stop
    it), no trust granted; yields (study, marker path)."""
    study = tmp_path / "study"
    shutil.copytree(crafted_study, study, ignore=shutil.ignore_patterns(".*.lock"))
    marker = tmp_path / "MARKER"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    monkeypatch.delenv(trust.ENV, raising=False)
    monkeypatch.syspath_prepend(str(study))
    sys.modules.pop(EVIL, None)
    yield study, marker
    sys.modules.pop(EVIL, None)


def commands(study: Path, tmp: Path) -> dict[str, list[str]]:
    ckpt = study / "base.pt"
    trial = min((study / "models").glob("*.pt"))
    spec = tmp / "evil_spec.yaml"
    spec.write_text((study / "spec.yaml").read_text())
    return {
        "info --base": ["info", "--base", str(ckpt)],
        "info --model": ["info", "--model", f"{EVIL}:build"],
        "export base": ["export", str(ckpt), "--out", str(tmp / "b.onnx")],
        "export trial": ["export", str(trial), "--format", "torchscript", "--out", str(tmp / "t.ts")],
        "retrain": ["retrain", str(study), "--trial", "0", "--epochs", "0", "--out", str(tmp / "r")],
        "search spec": ["search", str(spec), "--out", str(tmp / "s"), "--no-progress"],
        "search resume": ["search", str(study / "spec.yaml"), "--out", str(study), "--resume", "--max-trials", "2",
                          "--no-progress"],
        "prune": ["prune", "--base", str(ckpt), "--epochs", "0", "--out", str(tmp / "p.pt")],
        "prune trial": ["prune", "--base", str(trial), "--epochs", "0", "--out", str(tmp / "p2.pt")],
        "train": ["train", "--model", f"{EVIL}:build", "--epochs", "0", "--out", str(tmp / "m.pt")],
        "import --model": ["import", "--model", f"{EVIL}:build", "--state-dict", str(tmp / "sd.pt"), "--out",
                           str(tmp / "i.pt")],
        "import --checkpoint": ["import", "--checkpoint", str(ckpt), "--out", str(tmp / "i2.pt")],
        "pareto": ["pareto", str(study)],
        "latency": ["latency", "--base", str(ckpt), "--validate", "0"],
    }


CASES = ["info --base", "info --model", "export base", "export trial", "retrain", "search spec", "search resume",
         "prune", "prune trial", "train", "import --model", "import --checkpoint", "pareto", "latency"]


@pytest.mark.parametrize("case", CASES)
def test_no_command_imports_a_named_module_without_trust(case, armed, tmp_path, capsys):
    study, marker = armed
    before = {p.name: p.stat().st_mtime_ns for p in study.iterdir()}
    code = main(commands(study, tmp_path)[case])
    err = capsys.readouterr().err
    assert not marker.exists(), f"{case}: the module named by a received file ran"
    if case == "pareto":  # reads tables only: builds no model
        assert code == 0, err
        return
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"module {EVIL!r}" in err and f"--trust-code {EVIL}" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in study.iterdir()} == before  # nothing in the folder rewritten


@pytest.mark.parametrize("grant", ["flag", "env", "prefix-of-other"])
def test_trust_is_granted_only_where_autoprune_runs(grant, armed, tmp_path, monkeypatch, capsys):
    """The control: the same command with the module trusted does import it (so the test above can fail),
    and a prefix trusts a package and its submodules only."""
    study, marker = armed
    args = ["info", "--base", str(study / "base.pt")]
    if grant == "flag":
        args += ["--trust-code", f"other,{EVIL}"]
    elif grant == "env":
        monkeypatch.setenv(trust.ENV, EVIL)
    else:
        monkeypatch.setenv(trust.ENV, EVIL[:-2])  # "evilmod_tru" is not a prefix of the module
    code = main(args)
    if grant == "prefix-of-other":
        assert code == 2 and not marker.exists()
        return
    assert code == 0, capsys.readouterr().err
    assert marker.exists()
    assert trust.ENV not in os.environ or grant == "env"  # the flag's grant ends with the command


def test_python_api_takes_trust_code(armed):
    study, marker = armed
    spec = ModelSpec(f"{EVIL}:build", 10, 1, 8)
    with pytest.raises(trust.TrustError, match=f"--trust-code {EVIL}"):
        create_model(spec)
    with pytest.raises(trust.TrustError, match="base.pt"):
        load_base(study / "base.pt")
    assert not marker.exists()
    model, _ = load_base(study / "base.pt", trust_code=[EVIL])
    assert marker.exists() and isinstance(model, torch.nn.Module)
    assert trust.ENV not in os.environ


def test_the_search_api_takes_trust_code_as_its_refusal_says(tmp_path, monkeypatch):
    """autoprune.search is the documented front door: the TrustError's 'Python: trust_code=' must work there."""
    import inspect

    import autoprune

    monkeypatch.delenv(trust.ENV, raising=False)
    from autoprune.search.api import search

    assert "trust_code" in inspect.signature(search).parameters
    spec = {"study": "evil", "model": f"{EVIL}:build", "data": {"name": "digits"}}
    with pytest.raises(trust.TrustError, match="trust_code="):
        autoprune.search(spec, out=tmp_path / "s", progress=False)


@pytest.mark.parametrize("name", ["os:system", "builtins:eval", "subprocess:call", "this:build"])
def test_standard_library_names_are_refused_too(name, capsys, monkeypatch):
    monkeypatch.delenv(trust.ENV, raising=False)
    assert main(["info", "--model", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--trust-code {name.split(':')[0]}" in err


def test_registry_and_library_names_need_no_trust(monkeypatch):
    monkeypatch.delenv(trust.ENV, raising=False)
    for name in ("small_cnn", "torchvision:resnet18"):
        assert not trust.needs_trust(name)
    assert not trust.needs_trust("timm:resnet18")
    assert isinstance(create_model(ModelSpec("torchvision:resnet18", 10, 3, 32)), torch.nn.Module)


@pytest.mark.parametrize("value", ["../evil", "evil mod", "a..b", "-x"])
def test_a_bad_trust_entry_is_one_line(value, capsys):
    assert main(["info", "--model", "small_cnn", "--data", "synthetic", f"--trust-code={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a module name" in err


def test_python_m_does_not_import_from_the_working_directory(crafted_study, tmp_path):
    """`python -m autoprune retrain .` inside a received folder that ships the module: refused without
    trust; with trust, the folder is still not on the import path, so the shipped file never runs."""
    study = tmp_path / "study"
    shutil.copytree(crafted_study, study, ignore=shutil.ignore_patterns(".*.lock"))
    (study / "yaml.py").write_text(f"import pathlib; pathlib.Path({str(tmp_path / 'SHADOW')!r}).write_text('x')\n")
    marker = tmp_path / "MARKER"
    env = {k: v for k, v in os.environ.items() if k != trust.ENV}
    env[MARKER_ENV] = str(marker)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    for extra in ([], ["--trust-code", EVIL]):
        proc = subprocess.run([sys.executable, "-m", "autoprune", "retrain", ".", "--trial", "0", "--epochs", "0",
                               "--threads", "1", *extra], check=False, cwd=study, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and EVIL in proc.stderr, proc.stderr
        assert not marker.exists() and not (tmp_path / "SHADOW").exists()
