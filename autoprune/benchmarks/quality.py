"""Quality: autoprune's methods vs Torch-Pruning from one base, at equal MACs and equal fine-tuning.

Every row starts from the SAME base checkpoint (trained once, cached), is pruned to a MACs target
(0.7 / 0.5 / 0.3 / 0.2 of the base's conv + linear MACs), and is then measured three times on the
validation split: right after pruning, after adaptive BN recalibration (no training: BN running
statistics re-estimated on a fixed number of training batches, EagleEye, ECCV 2020), and after the
SAME fine-tune function of ours (same epochs, lr, batch size, cosine schedule) on the same fixed,
seeded training subset. Three seeds (the fine-tune seed and the calibration batches): mean and
standard deviation per configuration.

- autoprune: ``l1``, ``resrep``, ``lrf``, ``fsm`` with default parameters, ``uniform`` and ``global``
  allocation, through ``autoprune.prune`` (ResRep trains with compactors for its share of the
  epochs before surgery; the rest fine-tune).
- Torch-Pruning: MetaPruner with GroupMagnitude, BNScale and GroupTaylor importance, uniform and
  global pruning, the ratio bisected to the target (:mod:`.tp_baseline`).

Validation split only; the test split is never read (only the base's test accuracy is reported).
Rows are appended to a cache as they finish, so an interrupted run of the same code (the git tree
of ``autoprune/``) continues where it stopped.

    python -m autoprune.benchmarks.quality --data fashionmnist   # the headline (~1-2 h on 2 CPU cores)
    python -m autoprune.benchmarks.quality --data digits         # the quick demo's data
    python -m autoprune.benchmarks.quality --quick               # CI-sized: digits, 2 targets, 1 seed
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datasets import Dataset, DataSpec, TensorSplit, load_data
from ..data.splits import check_split
from ..engine import pruning as engine
from ..engine.calibrate import DEFAULT_BATCH_SIZE, DEFAULT_BATCHES, recalibrate_bn
from ..engine.cost import count_macs, count_params
from ..engine.plan import load_base, save_base
from ..errors import AutopruneError
from ..methods import get_method, make_params
from ..models.registry import ModelSpec, create_model
from ..train import TrainConfig, evaluate, fit, resolve_device
from . import common, quality_tables
from .tp_baseline import bisect_ratio, tp_macs, tp_prune

log = logging.getLogger(__name__)

TARGETS = (0.7, 0.5, 0.3, 0.2)
CACHE = Path("~/.cache/autoprune/benchmarks").expanduser()


@dataclass(frozen=True)
class Case:
    model: str
    data: DataSpec
    base_epochs: int
    base_lr: float
    base_batch_size: int
    epochs: int  # the training budget E of every pruned model
    lr: float  # fine-tune learning rate (the same for every method)
    batch_size: int
    ft_subset: int | None  # fine-tune on this many training images (fixed, seeded); None = the whole split


CASES = {
    "digits": Case("small_cnn", DataSpec("digits", seed=0), base_epochs=30, base_lr=0.05, base_batch_size=64,
                   epochs=3, lr=0.01, batch_size=64, ft_subset=None),
    # 3000 validation images (SE of one accuracy ~0.55 points at 90 %), 57000 to train the base on.
    "fashionmnist": Case("resnet20", DataSpec("fashionmnist", seed=0, val_fraction=0.05), base_epochs=3,
                         base_lr=0.1, base_batch_size=128, epochs=3, lr=0.01, batch_size=64, ft_subset=1000),
    "synthetic": Case("resnet20", DataSpec("synthetic", seed=0), base_epochs=15, base_lr=0.05, base_batch_size=64,
                      epochs=3, lr=0.01, batch_size=64, ft_subset=None),
}

# label -> (method, allocation mode, parameters); default parameters: the search tunes them, this does not.
OURS: dict[str, tuple[str, str, dict[str, Any]]] = {
    f"autoprune {m}{'' if a == 'global' else ' (uniform)'}": (m, a, {})
    for m in ("l1", "resrep", "lrf", "fsm") for a in ("global", "uniform")}
# --ablation: does each method's compensation (or searched knob) earn its place? Global allocation.
ABLATION: dict[str, tuple[str, str, dict[str, Any]]] = {
    "autoprune lrf": ("lrf", "global", {}),
    "autoprune lrf, no compensation": ("lrf", "global", {"compensate": False}),
    "autoprune lrf, weight-space fit": ("lrf", "global", {"fit": "weights"}),
    "autoprune lrf, weight-space fit, no compensation": ("lrf", "global", {"fit": "weights", "compensate": False}),
    "autoprune fsm": ("fsm", "global", {}),
    "autoprune fsm, no compensation": ("fsm", "global", {"compensation": "none"}),
    "autoprune fsm, measured compensation": ("fsm", "global", {"compensation": "measured"}),
    "autoprune resrep": ("resrep", "global", {}),
    "autoprune l1": ("l1", "global", {}),
    "autoprune resrep, forget_by 0.4": ("resrep", "global", {"forget_by": 0.4}),
    "autoprune resrep, forget_by 0.8": ("resrep", "global", {"forget_by": 0.8}),
    "autoprune resrep, no restat": ("resrep", "global", {"restat": False}),
    "autoprune resrep, prior none": ("resrep", "global", {"prior": "none"}),
    "autoprune resrep, init scaled, prior none": ("resrep", "global", {"init": "scaled", "prior": "none"}),
    "autoprune resrep, compactor_momentum 0.99": ("resrep", "global", {"compactor_momentum": 0.99}),
    "autoprune resrep, train_share 0.75": ("resrep", "global", {"train_share": 0.75}),
    "autoprune resrep, reach 0.2, forget_by 0.4": ("resrep", "global", {"warmup": 0.05, "reach": 0.2, "forget_by": 0.4}),
    # the defaults before this table: the ranking carried by scaled compactors, the paper's momentum,
    # a quarter of the budget as a restarted fine-tune, a slower schedule, no measured BN statistics
    "autoprune resrep, previous defaults": ("resrep", "global", {
        "init": "scaled", "prior": "none", "compactor_momentum": 0.99, "train_share": 0.75, "warmup": 0.05,
        "reach": 0.2, "forget_by": 0.4, "restat": False}),
}
ABLATION_PAIRS = (
    ("autoprune lrf", "autoprune lrf, no compensation"),
    ("autoprune lrf, weight-space fit", "autoprune lrf, weight-space fit, no compensation"),
    ("autoprune lrf", "autoprune lrf, weight-space fit"),
    ("autoprune fsm", "autoprune fsm, no compensation"),
    ("autoprune fsm, measured compensation", "autoprune fsm"),
    ("autoprune resrep", "autoprune l1"),
    ("autoprune resrep", "autoprune resrep, previous defaults"),
    ("autoprune resrep", "autoprune resrep, no restat"),
    ("autoprune resrep", "autoprune resrep, prior none"),
    ("autoprune resrep", "autoprune resrep, init scaled, prior none"),
    ("autoprune resrep", "autoprune resrep, compactor_momentum 0.99"),
    ("autoprune resrep", "autoprune resrep, train_share 0.75"),
    ("autoprune resrep", "autoprune resrep, reach 0.2, forget_by 0.4"),
    ("autoprune resrep", "autoprune resrep, forget_by 0.4"),
    ("autoprune resrep, forget_by 0.4", "autoprune resrep, forget_by 0.8"),
)
# label -> (importance, global pruning)
THEIRS = {f"tp {k}{'' if g else ' (uniform)'}": (k, g) for k in ("magnitude", "bnscale", "taylor") for g in (True, False)}
SEED_DEPENDENT_TP = {"taylor"}  # its calibration batch follows the seed; the others prune the same each seed


@dataclass
class Bench:
    """The shared base model, data and fine-tune subset of one case."""

    case: Case
    data: Dataset  # train = the fine-tune subset
    model: nn.Module
    spec: ModelSpec
    base: dict[str, Any]
    device: torch.device
    recal_batches: int

    @property
    def base_acc(self) -> float:
        return float(self.base["val_acc"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.spec.in_channels, self.spec.image_size, self.spec.image_size)

    def cfg(self, epochs: int, seed: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, lr=self.case.lr, batch_size=self.case.batch_size, seed=seed)


def _case_key(case: Case) -> str:
    return hashlib.sha1(json.dumps(dataclasses.asdict(case), sort_keys=True, default=str).encode()).hexdigest()[:10]


def _subset(split: TensorSplit, n: int | None, seed: int) -> TensorSplit:
    if n is None or n >= len(split):
        return split
    rows = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    index = rows.to(split.x.device)
    indices = None if split.indices is None else split.indices[rows]
    return TensorSplit(split.x[index], split.y[index], split.mean, split.std, indices)


def prepare(name: str, device: torch.device, ft_subset: int | None = -1,
            recal_batches: int = DEFAULT_BATCHES, case: Case | None = None, base_path: str | None = None) -> Bench:
    """Load the data, train (or load the cached) base, cut the fine-tune subset.

    ``ft_subset``: -1 keeps the case's subset, 0 or None fine-tunes on the whole training split.
    ``case``: instead of ``CASES[name]`` (any data set); ``base_path``: a trained base checkpoint of
    ``case.model`` on this data (its split is checked) instead of the cached or trained one.
    """
    case = case or CASES[name]
    case = case if ft_subset == -1 else dataclasses.replace(case, ft_subset=ft_subset or None)
    full = load_data(case.data, device)
    spec = ModelSpec(case.model, full.num_classes, full.in_channels, full.image_size)
    base_case = dataclasses.replace(case, epochs=0, lr=0.0, batch_size=0, ft_subset=None)  # what the base depends on
    path = Path(base_path) if base_path else CACHE / f"base_{name}_{_case_key(base_case)}.pt"
    if base_path and not path.is_file():
        raise AutopruneError(f"base checkpoint {path} not found; fix --base")
    if base_path:
        model, ckpt = load_base(path, device)
        if ModelSpec.from_dict(ckpt["model"]) != spec:
            raise AutopruneError(f"base checkpoint {path} holds {ModelSpec.from_dict(ckpt['model'])}, this data needs "
                                 f"{spec}; fix --base or --model")
        check_split(ckpt, case.data, f"base checkpoint {path}")  # its training set must not hold our val/test
        base = {"val_acc": evaluate(model, full.val, device)["acc"]}
        log.info("base %s on %s from %s: val acc %.4f", case.model, name, path, base["val_acc"])
    elif path.is_file():
        model, ckpt = load_base(path, device)
        base = dict(ckpt["metrics"])
        log.info("base %s on %s from cache %s: val acc %.4f", case.model, name, path, base["val_acc"])
    else:
        torch.manual_seed(0)
        model = create_model(spec)
        start = time.perf_counter()
        fit(model, full.train, None, TrainConfig(epochs=case.base_epochs, lr=case.base_lr,
                                                 batch_size=case.base_batch_size, seed=0), device, progress=True)
        model.eval()
        base = {"val_acc": evaluate(model, full.val, device)["acc"],
                "test_acc": evaluate(model, full.test, device)["acc"],  # reported once, never used to select
                "train_images": len(full.train), "epochs": case.base_epochs, "seconds": time.perf_counter() - start}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_base(path, model, spec, case.data, base)
        log.info("base %s on %s: val %.4f test %.4f after %d epochs (%.0f s), cached in %s", case.model, name,
                 base["val_acc"], base["test_acc"], case.base_epochs, base["seconds"], path)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    base["macs"], base["params"], base["tp_macs"] = count_macs(model, shape), count_params(model), tp_macs(model, shape)
    train = _subset(full.train, case.ft_subset, seed=1234)  # type: ignore[arg-type]
    data = dataclasses.replace(full, train=train)
    return Bench(case, data, model.eval(), spec, base, device, recal_batches)


# --------------------------------------------------------------------------- one row


def measure(b: Bench, label: str, target: float, seed: int, model: nn.Module, train_epochs: int,
            prune_s: float, keep: list[nn.Module] | None = None, **extra: Any) -> dict[str, Any]:
    """Before / after BN recalibration / after fine-tuning, for one pruned model and seed (the fine-tuned
    model is appended to ``keep`` when given)."""
    before = evaluate(model, b.data.val, b.device)["acc"]
    start = time.perf_counter()
    recalibrate_bn(model, b.data.train, b.recal_batches, DEFAULT_BATCH_SIZE, b.device, seed=seed)
    recal_s = time.perf_counter() - start
    recal = evaluate(model, b.data.val, b.device)["acc"]
    ft = b.case.epochs - train_epochs
    start = time.perf_counter()
    if ft > 0:
        fit(model, b.data.train, None, b.cfg(ft, seed), b.device)
    ft_s = time.perf_counter() - start
    after = evaluate(model, b.data.val, b.device)["acc"]
    macs = count_macs(model, b.shape)
    row = {"method": label, "target": target, "seed": seed, "MACs frac": macs / b.base["macs"],
           "MACs frac (TP counter)": tp_macs(model, b.shape) / b.base["tp_macs"],
           "params frac": count_params(model) / b.base["params"],
           "val acc before FT": before, "val acc after BN recal": recal, "val acc after FT": after,
           "epochs (train+FT)": f"{train_epochs}+{max(ft, 0)}", "prune s": prune_s + recal_s, "FT s": ft_s, **extra}
    log.info("%s @ %.2f seed %d: MACs %.3f, acc %.4f -> recal %.4f -> FT %.4f", label, target, seed,
             row["MACs frac"], before, recal, after)
    if keep is not None:
        keep.append(model)
    return row


def run_ours(b: Bench, label: str, method: str, alloc: str, params: dict[str, Any], target: float,
             seed: int, keep: list[nn.Module] | None = None) -> dict[str, Any]:
    impl = get_method(method)
    k = min(b.case.epochs, max(0, int(impl.training_epochs(make_params(impl, params), b.case.epochs))))
    start = time.perf_counter()
    res = engine.prune(b.model, method, target, data=b.data, allocation={"mode": alloc}, input_shape=b.shape,
                       device=b.device, train_cfg=b.cfg(k, seed), recalibrate_batches=0, **params)
    return measure(b, label, target, seed, res.model, k, time.perf_counter() - start, keep)


def run_theirs(b: Bench, label: str, kind: str, global_pruning: bool, target: float, seed: int,
               cache: dict[tuple[str, float], tuple[nn.Module, float, float]],
               keep: list[nn.Module] | None = None) -> dict[str, Any]:
    key = (label, target)
    if key not in cache or kind in SEED_DEPENDENT_TP:
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        calib = next(iter(b.data.train.batches(128, shuffle=True, generator=gen)))
        budget = target * b.base["macs"]
        ratio, model = bisect_ratio(lambda r: tp_prune(b.model, kind, r, global_pruning, b.shape, calib),
                                    lambda m: count_macs(m, b.shape), budget)
        cache[key] = (model, ratio, time.perf_counter() - start)
    model, ratio, seconds = cache[key]
    return measure(b, label, target, seed, copy.deepcopy(model), 0, seconds, keep, tp_ratio=ratio)


# --------------------------------------------------------------------------- driver


def _code_version() -> str:
    """The git tree hash of autoprune/ (rows of other code are never reused), or 'nogit'."""
    import subprocess

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], check=False, capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip()

    try:
        tree, dirty = git("rev-parse", "HEAD:autoprune"), git("status", "--porcelain", "autoprune")
    except (OSError, subprocess.SubprocessError):
        return "nogit"
    return (tree[:10] or "nogit") + ("+dirty" if dirty else "")


def _row_cache(name: str, b: Bench, fresh: bool) -> tuple[Path, dict[tuple[str, float, int], dict[str, Any]]]:
    key = _case_key(b.case) + f"_r{b.recal_batches}_{b.device.type}_{_code_version()}"
    path = CACHE / f"quality_rows_{name}_{key}.jsonl"
    done: dict[tuple[str, float, int], dict[str, Any]] = {}
    if path.is_file() and not fresh:
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row cut off by a kill: run it again
                continue
            done[(row["method"], row["target"], row["seed"])] = row
        log.info("continuing from %d finished rows in %s (--fresh starts over)", len(done), path)
    elif path.is_file():
        path.unlink()
    return path, done


def run_case(name: str, args: Any, targets: Sequence[float], seeds: Sequence[int]) -> tuple[Bench, list[dict]]:
    b = prepare(name, resolve_device(args.device), args.ft_subset, args.recal_batches)
    path, done = _row_cache(name + ("_ablation" if args.ablation else ""), b, args.fresh)
    cache: dict[tuple[str, float], tuple[nn.Module, float, float]] = {}
    rows = []
    ours = ABLATION if args.ablation else OURS
    labels = list(ours) if args.ablation else [*OURS, *THEIRS]
    if args.configs:
        labels = [label for label in labels if any(c in label for c in args.configs)]
    jobs = [(s, t, label) for s in seeds for t in targets for label in labels]
    for i, (seed, target, label) in enumerate(jobs, 1):
        if (label, target, seed) in done:
            rows.append(done[(label, target, seed)])
            continue
        log.info("[%d/%d] %s @ %.2f, seed %d", i, len(jobs), label, target, seed)
        common.seed_all(seed)
        try:
            if label in ours:
                row = run_ours(b, label, *ours[label], target, seed)
            else:
                row = run_theirs(b, label, *THEIRS[label], target, seed, cache)
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not lose the others
            log.error("%s @ %.2f seed %d failed: %s", label, target, seed, exc)
            row = {"method": label, "target": target, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return b, rows


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", choices=sorted(CASES), default=None,
                   help="cases (data sets) to run (default: fashionmnist; --quick: digits)")
    p.add_argument("--targets", nargs="+", type=float, default=None, help=f"MACs targets (default {TARGETS})")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="fine-tune seeds (default 0 1 2; --quick 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: CUDA when present)")
    p.add_argument("--ft-subset", type=int, default=-1,
                   help="fine-tune on this many training images (default: the case's; 0 = the whole split)")
    p.add_argument("--recal-batches", type=int, default=DEFAULT_BATCHES,
                   help=f"BN recalibration batches of {DEFAULT_BATCH_SIZE} images (default {DEFAULT_BATCHES})")
    p.add_argument("--fresh", action="store_true", help="ignore rows cached by an earlier, interrupted run")
    p.add_argument("--configs", nargs="+", default=None,
                   help="run only the configurations whose label contains one of these strings")
    p.add_argument("--ablation", action="store_true",
                   help="instead of the comparison: each method with and without its compensation / knob values")
    args = p.parse_args(argv)
    common.setup(args)
    cases = args.data or (["digits"] if args.quick else ["fashionmnist"])
    targets = tuple(args.targets or ((0.5, 0.3) if args.quick else TARGETS))
    seeds = tuple(args.seeds if args.seeds is not None else ((0,) if args.quick else (0, 1, 2)))
    start = time.perf_counter()
    tables: list[common.Table] = []
    for name in cases:
        b, rows = run_case(name, args, targets, seeds)
        tables += quality_tables.tables(name, b, rows, targets, seeds, first=not tables,
                                        pairs=ABLATION_PAIRS if args.ablation else (),
                                        key_prefix=f"{name}_" if len(cases) > 1 or name == "digits" else "")
    tables[-1] = dataclasses.replace(tables[-1], notes=(*tables[-1].notes,
                                                        f"Total benchmark time {time.perf_counter() - start:.0f} s."))
    suffix = (("" if cases == ["digits"] else "_" + "_".join(cases)) + ("_ablation" if args.ablation else "")
              + ("_subset" if args.configs else ""))
    common.write_tables("quality" + suffix, tables, args.out, common.command_line("quality", argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
