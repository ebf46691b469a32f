"""Quality: autoprune's methods vs Torch-Pruning's own pruners at equal MACs and equal budget.

Same base model, data, MACs targets (0.7 / 0.5 / 0.3 / 0.2 of the base) and training budget of E
epochs for every method. Autoprune's methods run through ``autoprune.prune`` with their default
parameters under the trial protocol (a training-time method such as ResRep takes
``training_epochs(E)`` of the E epochs, the rest fine-tune after surgery). Torch-Pruning's pruners
run as its README shows (``tp.pruner.MagnitudePruner`` with ``MagnitudeImportance(p=1)``,
``TaylorImportance`` after a loss backward on a calibration batch, ``BNScalePruner`` with
``BNScaleImportance``, optionally after one epoch of ``pruner.regularize`` sparse training taken from
the same E), ``global_pruning=True`` and the classifier in ``ignored_layers``. Torch-Pruning has
no MACs target, only a channel ``pruning_ratio``: we bisect that ratio until the pruned model's MACs
are at most the target. When the search layer is installed, a short search on the same base adds
its best front point under each target and that configuration re-run at the target.

Validation split only; the test split is never read. Seeds are fixed.

    python -m autoprune.benchmarks.quality                     # small_cnn on digits
    python -m autoprune.benchmarks.quality --cases digits synthetic
    python -m autoprune.benchmarks.quality --quick             # 2 targets, no search
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .. import engine
from ..allocate import AllocationConfig
from ..cost import count_macs, count_params
from ..data import Dataset, DataSpec, load_data
from ..methods import get_method, make_params
from ..models import ModelSpec, classifier_name, create_model
from ..plan import save_base
from ..train import Callbacks, TrainConfig, evaluate, fit
from . import common

log = logging.getLogger(__name__)

TARGETS = (0.7, 0.5, 0.3, 0.2)


@dataclass(frozen=True)
class Case:
    model: str
    data: DataSpec
    base_epochs: int
    base_lr: float
    batch_size: int
    epochs: int  # the training budget E of every pruned model
    lr: float  # fine-tune learning rate (the same for every method)


CASES = {
    "digits": Case("small_cnn", DataSpec("digits", seed=0), base_epochs=30, base_lr=0.05, batch_size=64,
                   epochs=3, lr=0.01),
    "synthetic": Case("resnet20", DataSpec("synthetic", seed=0), base_epochs=15, base_lr=0.05, batch_size=64,
                      epochs=3, lr=0.01),
}

# label -> (method, params, allocation); defaults everywhere: the search tunes them, this does not.
AUTOPRUNE = {
    "autoprune l1": ("l1", {}, {"mode": "global"}),
    "autoprune l1 (uniform)": ("l1", {}, {"mode": "uniform"}),
    "autoprune resrep": ("resrep", {}, {"mode": "global"}),
    "autoprune lrf": ("lrf", {}, {"mode": "global"}),
    "autoprune fsm": ("fsm", {}, {"mode": "global"}),
}
# label -> (importance kind, global pruning, sparse-training epochs)
TORCH_PRUNING = {
    "tp magnitude (L1)": ("magnitude", True, 0),
    "tp magnitude (L1, uniform)": ("magnitude", False, 0),
    "tp taylor": ("taylor", True, 0),
    "tp bn-scale": ("bnscale", True, 0),
    "tp bn-scale + 1 ep sparse": ("bnscale", True, 1),
}


@dataclass
class Bench:
    """The shared base model and data of one case."""

    case: Case
    data: Dataset
    model: nn.Module
    spec: ModelSpec
    base_acc: float
    device: torch.device

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.spec.in_channels, self.spec.image_size, self.spec.image_size)

    def cfg(self, epochs: int, lr: float | None = None) -> TrainConfig:
        return TrainConfig(epochs=epochs, lr=self.case.lr if lr is None else lr, batch_size=self.case.batch_size,
                           seed=0)

    def row(self, label: str, target: float, model: nn.Module, before: float, train_epochs: int,
            seconds: float, lr: float | None = None, **extra: Any) -> dict[str, Any]:
        """Fine-tune ``model`` for the rest of the budget and measure it."""
        ft = self.case.epochs - train_epochs
        if ft > 0:
            fit(model, self.data.train, self.data.val, self.cfg(ft, lr), self.device)
        after = evaluate(model, self.data.val, self.device)["acc"]
        base_macs, base_params = count_macs(self.model, self.shape), count_params(self.model)
        ex = torch.zeros(1, *self.shape, device=self.device)
        tp_macs = tp.utils.count_ops_and_params(model, ex)[0] / tp.utils.count_ops_and_params(self.model, ex)[0]
        out = {"method": label, "target": target, "MACs frac": count_macs(model, self.shape) / base_macs,
               "MACs frac (TP counter)": tp_macs, "params frac": count_params(model) / base_params,
               "val acc before FT": before, "val acc after FT": after,
               "epochs (train+FT)": f"{train_epochs}+{ft}", "prune s": seconds, **extra}
        log.info("%s @ %.2f: MACs %.3f, acc %.4f -> %.4f", label, target, out["MACs frac"], before, after)
        return out


def prepare(name: str, device: torch.device, epochs: int | None = None) -> Bench:
    case = CASES[name] if epochs is None else dataclasses.replace(CASES[name], epochs=epochs)
    data = load_data(case.data, device)
    spec = ModelSpec(case.model, data.num_classes, data.in_channels, data.image_size)
    torch.manual_seed(0)
    model = create_model(spec)
    start = time.perf_counter()
    fit(model, data.train, data.val, TrainConfig(epochs=case.base_epochs, lr=case.base_lr,
                                                  batch_size=case.batch_size, seed=0), device)
    model.eval()
    acc = evaluate(model, data.val, device)["acc"]
    log.info("base %s on %s: val acc %.4f after %d epochs (%.0f s)", case.model, case.data.name, acc,
             case.base_epochs, time.perf_counter() - start)
    return Bench(case, data, model, spec, acc, device)


# --------------------------------------------------------------------------- autoprune


def run_autoprune(b: Bench, label: str, method: str, params: Mapping[str, Any],
                  allocation: Mapping[str, Any] | AllocationConfig,
                  target: float, lr: float | None = None, **extra: Any) -> dict[str, Any]:
    impl = get_method(method)
    k = min(b.case.epochs, max(0, int(impl.training_epochs(make_params(impl, params), b.case.epochs))))
    start = time.perf_counter()
    alloc = allocation if isinstance(allocation, AllocationConfig) else AllocationConfig(**dict(allocation))
    res = engine.prune(b.model, method, target, data=b.data, allocation=alloc, input_shape=b.shape,
                       device=b.device, train_cfg=b.cfg(k, lr), **params)
    seconds = time.perf_counter() - start
    model = res.model
    before = evaluate(model, b.data.val, b.device)["acc"]
    return b.row(label, target, model, before, k, seconds, lr, **extra)


# --------------------------------------------------------------------------- Torch-Pruning


def _tp_pruner(kind: str, model: nn.Module, example: torch.Tensor, ratio: float, global_pruning: bool,
               ignored: list[nn.Module]) -> Any:
    """A Torch-Pruning pruner built as its README shows."""
    common_kw = {"pruning_ratio": ratio, "global_pruning": global_pruning, "ignored_layers": ignored}
    if kind == "bnscale":
        return tp.pruner.BNScalePruner(model, example, importance=tp.importance.BNScaleImportance(), **common_kw)
    imp = tp.importance.MagnitudeImportance(p=1) if kind == "magnitude" else tp.importance.TaylorImportance()
    return tp.pruner.MagnitudePruner(model, example, importance=imp, **common_kw)


def _tp_prune(b: Bench, source: nn.Module, kind: str, ratio: float, global_pruning: bool,
              calib: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(source).eval()
    example = torch.randn(1, *b.shape, generator=torch.Generator().manual_seed(0)).to(b.device)
    ignored = [model.get_submodule(classifier_name(model))]  # never prune the classifier
    pruner = _tp_pruner(kind, model, example, ratio, global_pruning, ignored)
    if kind == "taylor":  # Taylor importance needs gradients: a real loss on a calibration batch
        model.zero_grad()
        F.cross_entropy(model(calib[0]), calib[1]).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def bisect_ratio(make: Callable[[float], nn.Module], macs_of: Callable[[nn.Module], int], budget: float,
                 iters: int = 11) -> tuple[float, nn.Module]:
    """Smallest channel pruning ratio (to 2^-iters) whose pruned model has at most ``budget`` MACs.

    Torch-Pruning's own limitation worked around: it takes a channel ratio, not a MACs target.
    """
    lo, hi, best = 0.0, 1.0, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        try:
            model = make(mid)
            macs = macs_of(model)
        except Exception as exc:  # noqa: BLE001 - a ratio too high for TP (a layer emptied): prune less
            log.debug("torch-pruning failed at ratio %.4f: %s", mid, exc)
            hi = mid
            continue
        if macs <= budget:
            hi, best = mid, (mid, model)
        else:
            lo = mid
    if best is None:
        raise RuntimeError("no pruning ratio reached the MACs budget")
    return best


def run_torch_pruning(b: Bench, label: str, kind: str, global_pruning: bool, sparse_epochs: int,
                      target: float) -> dict[str, Any]:
    start = time.perf_counter()
    calib = next(iter(b.data.train.batches(128, shuffle=True, generator=torch.Generator().manual_seed(0))))
    source = b.model
    if sparse_epochs:  # sparse training as documented: pruner.regularize(model) between backward and step
        source = copy.deepcopy(b.model)
        example = torch.zeros(1, *b.shape, device=b.device)
        pruner = _tp_pruner(kind, source, example, 0.5, global_pruning,
                            [source.get_submodule(classifier_name(source))])
        fit(source, b.data.train, b.data.val, b.cfg(sparse_epochs), b.device,
            Callbacks(after_backward=lambda model, _step: pruner.regularize(model)))
        source.eval()
    budget = target * count_macs(b.model, b.shape)
    ratio, model = bisect_ratio(lambda r: _tp_prune(b, source, kind, r, global_pruning, calib),
                                lambda m: count_macs(m, b.shape), budget)
    seconds = time.perf_counter() - start
    before = evaluate(model, b.data.val, b.device)["acc"]
    return b.row(label, target, model, before, sparse_epochs, seconds, tp_ratio=ratio)


# --------------------------------------------------------------------------- search


def search_rows(b: Bench, targets: Sequence[float], trials: int, seed: int) -> list[dict[str, Any]]:
    """Best front point of a short search under each target, and its configuration re-run at the target."""
    try:
        import yaml

        from ..search import space
        from ..search.runner import run_search
        from ..search.spec import load_spec
        from .common import demo_spec
    except ImportError as exc:
        log.warning("search layer not available (%s): no search rows", exc)
        return []
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="autoprune_quality_") as tmp:
        work = Path(tmp)
        base_path = work / "base.pt"
        save_base(base_path, b.model, b.spec, b.case.data,
                  {"val_acc": b.base_acc, "macs": count_macs(b.model, b.shape), "params": count_params(b.model)})
        spec_path = work / "spec.yaml"
        spec_dict = demo_spec(f"quality_{b.case.data.name}", b.case.model, b.case.data.to_dict(), str(base_path),
                              trials, seed, str(b.device), epochs=b.case.epochs, batch_size=b.case.batch_size,
                              target_low=0.15)
        spec_path.write_text(yaml.safe_dump(spec_dict, sort_keys=False))
        spec = load_spec(spec_path)
        start = time.perf_counter()
        result = run_search(spec, out_dir=work / "study", progress=False)
        seconds = time.perf_counter() - start
        log.info("search: %d trials in %.0f s (%s)", len(result.rows), seconds, result.counts)
        done = [r for r in result.rows if r["state"] == "complete" and r["feasible"]]
        for t in targets:
            under = [r for r in done if float(r["macs_frac"]) <= t + 1e-9]
            if not under:
                continue
            best = max(under, key=lambda r: float(r["val_acc"]))
            method, _, alloc, params, _, lr = space.to_prune_args(best, spec.allocation)
            desc = f"trial {best['number']}: {method}, {alloc.mode}, lr {float(lr):.3g}" + (
                f", {params}" if params else "")
            rows.append({"method": f"search ({trials} trials): best front point", "target": t,
                         "MACs frac": float(best["macs_frac"]), "params frac": float(best["params_frac"]),
                         "val acc after FT": float(best["val_acc"]), "epochs (train+FT)": f"{b.case.epochs} total",
                         "prune s": seconds / max(1, len(result.rows)), "config": desc})
            rows.append(run_autoprune(b, "search: best config re-run at target", method, params, alloc, t,
                                      lr=float(lr), config=desc))
    return rows


# --------------------------------------------------------------------------- tables


def summary(case: str, rows: Sequence[Mapping[str, Any]], targets: Sequence[float]) -> list[dict[str, Any]]:
    """Per target: the best autoprune row vs the best Torch-Pruning row, after and before fine-tuning."""
    out = []
    for t in targets:
        at = [r for r in rows if r.get("target") == t and r.get("val acc before FT") is not None]
        ours = [r for r in at if str(r["method"]).startswith("autoprune")]
        searched = [r for r in at if str(r["method"]).startswith("search: best config")]
        peers = [r for r in at if str(r["method"]).startswith("tp ")]
        if not ours or not peers:
            continue
        row: dict[str, Any] = {"case": case, "target": t}
        for when, key in (("after FT", "val acc after FT"), ("before FT", "val acc before FT")):
            # before FT: one-shot methods only (a method that trained before surgery had epochs the others had not)
            ok = (lambda r: True) if when == "after FT" else (lambda r: str(r["epochs (train+FT)"]).startswith("0+"))
            a = max(filter(ok, ours), key=lambda r, k=key: r[k])
            p = max(filter(ok, peers), key=lambda r, k=key: r[k])
            row[f"autoprune best {when}"] = f"{a[key]:.3f} ({a['method'].removeprefix('autoprune ')})"
            row[f"TP best {when}"] = f"{p[key]:.3f} ({p['method'].removeprefix('tp ')})"
            row[f"diff {when} (points)"] = 100 * (a[key] - p[key])
        if searched:
            best_tp = max(r["val acc after FT"] for r in peers)
            row["search re-run after FT"] = searched[0]["val acc after FT"]
            row["search - TP after FT (points)"] = 100 * (searched[0]["val acc after FT"] - best_tp)
        out.append(row)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["digits"], help="default: digits")
    p.add_argument("--targets", nargs="+", type=float, default=None, help=f"MACs targets (default {TARGETS})")
    p.add_argument("--search-trials", type=int, default=None, help="trials of the short search (default 24; "
                   "--quick 0 = no search)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--epochs", type=int, default=None, help="training budget per pruned model (default: the case's, 3)")
    args = p.parse_args(argv)
    common.setup(args)
    targets = tuple(args.targets or ((0.5, 0.3) if args.quick else TARGETS))
    trials = args.search_trials if args.search_trials is not None else (0 if args.quick else 24)
    device = torch.device(args.device)
    start = time.perf_counter()
    tables, all_summary, notes = [], [], []
    for name in args.cases:
        b = prepare(name, device, args.epochs)
        rows: list[dict[str, Any]] = [{"method": "base (unpruned)", "target": 1.0, "MACs frac": 1.0,
                                       "params frac": 1.0, "val acc after FT": b.base_acc}]
        for t in targets:
            for label, (method, params, alloc) in AUTOPRUNE.items():
                common.seed_all(args.seed)
                rows.append(run_autoprune(b, label, method, params, alloc, t))
            for label, (kind, global_pruning, sparse) in TORCH_PRUNING.items():
                common.seed_all(args.seed)
                rows.append(run_torch_pruning(b, label, kind, global_pruning, sparse, t))
        if trials > 0:
            rows += search_rows(b, targets, trials, args.seed)
        rows.sort(key=lambda r: (-r["target"], _order(r["method"])))
        c = b.case
        tables.append(common.Table(
            "" if not tables else name, f"{name}: {c.model} on {c.data.name}, {c.epochs} epochs per pruned model",
            ("method", "target", "MACs frac", "MACs frac (TP counter)", "params frac", "val acc before FT",
             "val acc after FT", "epochs (train+FT)", "prune s", "tp_ratio", "config"), tuple(rows),
            ((f"Base: {c.model} trained {c.base_epochs} epochs (lr {c.base_lr}, batch {c.batch_size}), val acc "
             f"{b.base_acc:.4f}. Every pruned model then gets {c.epochs} epochs: fine-tuning at lr {c.lr}, "
             f"batch {c.batch_size}, cosine schedule, seed 0 (ResRep trains with compactors for part of them; "
             "'tp bn-scale + 1 ep sparse' spends one on sparse training)."),),
        ))
        all_summary += summary(name, rows, targets)
    notes = (
        ("MACs frac: conv + linear MACs for one sample over the base's (the definition every row is held to: "
        "each is at most the target). MACs frac (TP counter): the same model by tp.utils.count_ops_and_params, "
        "which also counts BN, activations and pooling."),
        ("Torch-Pruning has no MACs target: its pruning_ratio (a channel fraction) is bisected, 11 steps, to the "
        "smallest ratio whose pruned model is at most the target (tp_ratio). autoprune allocates to the target "
        "directly."),
        ("val acc before FT: right after pruning (ResRep: after its compactor training and folding). Digits' "
        "validation split has 359 images: one image is 0.28 points, so after-FT differences under ~1 point are "
        "noise; the before-FT column separates the methods. The summary's before-FT columns compare one-shot "
        "methods only (ResRep and sparse-trained BN-scale trained before surgery). "
        "after FT: at the end of the budget. Validation split only."),
        ("search rows: 'best front point' is the search's own trial (selected on the same validation split, so "
        "optimistic); 're-run at target' reruns that configuration at exactly the target with seed 0."),
        ("autoprune methods use their default parameters; the search tunes them. prune s: wall seconds from the "
        "base model to the pruned one (ResRep's training, TP's whole bisection and sparse epoch included)."),
        f"Total benchmark time {time.perf_counter() - start:.0f} s.",
    )
    tables.append(common.Table("summary", "Summary: best of each side at each target",
                               ("case", "target", "autoprune best after FT", "TP best after FT",
                                "diff after FT (points)", "autoprune best before FT", "TP best before FT",
                                "diff before FT (points)", "search re-run after FT", "search - TP after FT (points)"),
                               tuple(all_summary), notes))
    common.write_tables("quality", tables, args.out, common.command_line("quality", argv))
    return 0


def _order(label: str) -> int:
    for i, prefix in enumerate(("base", "autoprune", "search", "tp ")):
        if label.startswith(prefix):
            return i
    return 9


if __name__ == "__main__":
    raise SystemExit(main())
