"""Prove the dependency floors: install exactly the minimum versions pyproject.toml declares in a
scratch virtual environment, then run the smoke search (search_spaces/smoke.yaml) and the export of
one of its models there.

    python -m autoprune.benchmarks.min_versions            # floors of everything but torch/torchvision
    python -m autoprune.benchmarks.min_versions --all      # torch and torchvision at their floors too

Without ``--all`` the scratch venv also sees this interpreter's packages (a ``.pth`` file naming its
site-packages, searched after the venv's own), so torch and torchvision come from there: torch from
PyPI brings several GB of CUDA wheels, which a quick check should not download. Everything else is installed at ``==floor`` inside the venv, where it shadows
the system copies. numpy is pinned to its floor as well, because old pandas/scikit-learn wheels are
built against numpy 1.x. Not run in CI (it downloads packages and takes minutes); run it after
changing a floor or using a newer API. Writes results/benchmarks/min_versions.md with what was
installed and whether each step passed; exits 1 if one failed.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from .common import RESULTS_DIR, Table, write_tables

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision")  # installed at their floors only with --all
FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.\-]*)")


def floors(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """name -> minimum version from ``[project] dependencies`` (entries written ``name>=X``)."""
    text = pyproject.read_text(encoding="utf-8")
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.DOTALL | re.MULTILINE)
    if not block:
        raise SystemExit(f"{pyproject}: no [project] dependencies list")
    out = {}
    for entry in re.findall(r'"([^"]+)"', block.group(1)):
        m = FLOOR.match(entry)
        if m:
            out[m.group(1).lower()] = m.group(3)
    return out


def _run(cmd: list[str], timeout: float, cwd: Path | None = None) -> tuple[bool, float, str]:
    start = time.perf_counter()
    log.info("$ %s", " ".join(cmd))
    try:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the venv installed
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, check=False)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return proc.returncode == 0, time.perf_counter() - start, " / ".join(tail)[-300:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="install torch and torchvision at their floors too "
                   "(several GB from PyPI)")
    p.add_argument("--venv", help="where to create the scratch venv (default: a new temporary folder)")
    p.add_argument("--out", default=str(RESULTS_DIR), help=f"output folder (default: {RESULTS_DIR})")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed for each step")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    pins = floors()
    install = {n: v for n, v in pins.items() if args.all or n not in HEAVY}
    scratch = Path(args.venv or tempfile.mkdtemp(prefix="autoprune-min-"))
    scratch.mkdir(parents=True, exist_ok=True)
    venv, py = scratch / "venv", scratch / "venv" / "bin" / "python"
    parent = sysconfig.get_paths()["purelib"]
    see_parent = ("import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], "
                  f"'_autoprune_parent.pth').write_text({parent!r} + '\\n')")
    steps = [
        ("create venv", [sys.executable, "-m", "venv", str(venv)]),
        *([] if args.all else [("see this interpreter's torch", [str(py), "-c", see_parent])]),
        ("install floors", [str(py), "-m", "pip", "install", "-q", *[f"{n}=={v}" for n, v in install.items()]]),
        ("install autoprune (no deps)", [str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)]),
        ("pip check" + ("" if args.all else " (informational: also sees this interpreter's packages)"),
         [str(py), "-m", "pip", "check"]),
        ("smoke search", [str(py), "-m", "autoprune", "search", str(REPO / "search_spaces" / "smoke.yaml"),
                          "--out", str(scratch / "smoke"), "--no-progress"]),
        ("report of the study", [str(py), "-m", "autoprune", "pareto", str(scratch / "smoke")]),
    ]
    rows, ok_all = [], True
    for name, cmd in steps:
        ok, seconds, tail = _run(cmd, args.timeout, cwd=scratch)
        rows.append({"step": name, "ok": "yes" if ok else "NO", "seconds": f"{seconds:.0f}", "output (last lines)": tail})
        if name.startswith("pip check (informational"):
            rows[-1]["ok"] = "yes" if ok else "n/a"
            continue
        ok_all &= ok
        if not ok:
            break
    probe = f"import importlib.metadata as m; print(', '.join(f'{{n}} {{m.version(n)}}' for n in {sorted(pins)!r}))"
    versions = _run([str(py), "-c", probe], 120)[2] if venv.exists() else ""
    notes = (f"Floors from pyproject.toml: {', '.join(f'{n}>={v}' for n, v in pins.items())}.",
             f"Installed at ==floor: {', '.join(install)}" + ("" if args.all else
             "; torch and torchvision come from the running interpreter (pass --all to pin them too)") + ".",
             f"Versions seen in the venv: {versions}.")
    table = Table("", "Dependency floors: install and smoke search", ("step", "ok", "seconds", "output (last lines)"),
                  tuple(rows), notes)
    write_tables("min_versions", [table], Path(args.out),
                 command="python -m autoprune.benchmarks.min_versions" + (" --all" if args.all else ""))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
