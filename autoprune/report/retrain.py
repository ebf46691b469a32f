"""Pick a trial of a finished search, fine-tune it longer, report honest numbers, export it.

``retrain(study_dir, rule)`` runs four steps, each usable on its own: **pick**
(:func:`autoprune.report.choose.choose_trial`: by default the most accurate complete, feasible trial
satisfying the rule), **fine-tune** (:func:`finetune`: the trial's pruned model rebuilt from its
checkpoint, cosine schedule, optionally distilling from the study's base model, keeping the weights
of the best validation epoch), **test** (:func:`measure`: validation and, once, the held-out test
split, MACs, params and CPU latency, for the base and the pruned model) and **export**
(:func:`export_all`: ONNX and TorchScript, each checked against PyTorch). See DESIGN.md section 6.

Output folder (default ``<study>/retrained/trial_NNNN/``): ``model.pt`` (spec + Plan + weights),
``model.onnx``, ``model.ts``, ``metrics.json``, ``widths.png``, ``summary.md``. ``model.pt`` is
rewritten at every improving epoch, so an interrupted run (Ctrl-C) leaves the best model so far;
``metrics.json`` then says so and :class:`RetrainInterrupted` (a KeyboardInterrupt) is raised.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datasets import Dataset, DataSpec, load_data, parse_augmentation
from ..data.preprocess import recipe_for
from ..data.splits import check_split
from ..engine.cost import count_macs, count_params, measure_latency
from ..engine.plan import Plan, load_base, load_pruned, read_checkpoint, save_pruned
from ..errors import AutopruneError
from ..files import clean_temps, write_json, write_text
from ..models.registry import ModelSpec
from ..progress import phase
from ..train import Callbacks, TrainConfig, evaluate, fit, prefer_epoch, resolve_device
from ..trust import TrustCode, accepts_trust_code
from .choose import Choice, choose_trial, read_trials, study_name
from .export_check import export_checked
from .retrain_report import plot_widths, summary_markdown

__all__ = ["Choice", "RetrainInterrupted", "RetrainResult", "choose_trial", "export_all", "finetune", "measure",
           "read_trials", "retrain", "study_name"]

log = logging.getLogger(__name__)

FILES = {"model": "model.pt", "onnx": "model.onnx", "torchscript": "model.ts", "metrics": "metrics.json",
         "widths": "widths.png", "summary": "summary.md"}
LATENCY_BATCHES = (1, 32)
UNITS = {"macs": "MACs (multiply-accumulates) per sample of one input; FLOPs = 2 x MACs",
         "params": "parameters (BatchNorm running statistics excluded)",
         "latency_ms": "median milliseconds per forward pass on the CPU, by batch size",
         "acc": "top-1 accuracy, fraction in [0, 1]"}


@dataclass(frozen=True)
class RetrainResult:
    out_dir: Path
    choice: Choice
    metrics: Mapping[str, Any]
    files: Mapping[str, Path] = field(default_factory=dict)  # key (FILES) -> path, for files written

    @property
    def trial(self) -> int:
        return self.choice.trial


class RetrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during retraining; ``model_path`` holds the best epoch so far, ``metrics`` what is known."""

    def __init__(self, out_dir: Path, model_path: Path, best_epoch: int, best_val_acc: float) -> None:
        super().__init__(f"interrupted: best model so far (epoch {best_epoch}, val_acc {best_val_acc:.4f}) "
                         f"is in {model_path}")
        self.out_dir, self.model_path = out_dir, model_path
        self.best_epoch, self.best_val_acc = best_epoch, best_val_acc


# ------------------------------------------------------------------------------------------ retraining


@accepts_trust_code
def retrain(study_dir: str | Path, rule: str | None = None, *, trial: int | None = None, epochs: int = 30,
            lr: float | None = None, batch_size: int | None = None, distill: bool = False,
            distill_alpha: float = 0.7, augment: bool | str = False, out_dir: str | Path | None = None,
            device: str | torch.device = "auto", seed: int = 0, progress: bool = False,
            onnx_exporter: str = "auto", latency_repeats: int = 20, force: bool = False,
            trust_code: TrustCode = None) -> RetrainResult:
    """Retrain the trial ``rule`` (or ``trial``) selects; writes the output folder, returns its metrics.

    ``lr`` and ``batch_size`` default to the trial's own. With ``distill`` the loss mixes
    cross-entropy and distillation from ``<study>/base.pt`` (weight ``distill_alpha``). The
    returned validation accuracy is never below the loaded trial's: epoch 0 (no training) counts
    as a candidate for the best epoch; ties go to the lower validation loss, then to the later epoch
    (:func:`autoprune.train.prefer_epoch`), and ``metrics["retrain"]["best_reason"]`` says which rule
    kept it. An output folder that already holds a model is an AutopruneError unless ``force``.
    ``trust_code``: modules a ``package.module:function`` model may import (:mod:`autoprune.trust`).
    """
    if distill and not 0.0 < distill_alpha <= 1.0:
        raise AutopruneError(f"distill_alpha must be in (0, 1], got {distill_alpha}; 0.5..0.9 works well")
    if epochs < 0:
        raise AutopruneError(f"epochs must be >= 0, got {epochs}")
    study = Path(study_dir)
    choice = choose_trial(study, rule, trial)
    out = Path(out_dir) if out_dir is not None else study / "retrained" / f"trial_{choice.trial:04d}"
    _check_out(out, force)
    dev = resolve_device(device)
    model, ckpt = load_pruned(choice.model_path, dev)
    spec = ModelSpec.from_dict(ckpt["model"])
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    data_spec = _data_spec(study, ckpt)
    base_model, base_ckpt = _load_base(study, spec, dev)
    data = load_data(data_spec, dev)
    check_split(base_ckpt, data, str(study / "base.pt"))  # test accuracy only on images the base never saw
    hparams = dict((ckpt.get("extra") or {}).get("params") or {})
    lr = float(lr if lr is not None else hparams.get("lr") or choice.row.get("lr") or 0.01)
    batch_size = int(batch_size if batch_size is not None else hparams.get("batch_size") or 128)
    cfg = TrainConfig(epochs=int(epochs), lr=lr, batch_size=batch_size, seed=int(seed),
                      augment=parse_augmentation(augment, data_spec.name),
                      distill_alpha=float(distill_alpha) if distill else 0.0)
    out.mkdir(parents=True, exist_ok=True)
    clean_temps(out)  # what a killed write left
    for key in ("onnx", "torchscript", "metrics", "widths", "summary"):  # a previous run's, now stale
        (out / FILES[key]).unlink(missing_ok=True)
    head = {"study": study_name(study), "study_dir": str(study), "trial": choice.trial, "rule": choice.rule,
            "reason": choice.reason}
    saver = _BestSaver(out / FILES["model"], model, spec, Plan.from_dict(ckpt["plan"]), data_spec,
                       {"trial": choice.trial, "params": hparams, "rule": choice.rule, "study": str(study)})
    run = finetune(model, data, cfg, dev, saver, base_model if distill else None, progress, choice, head)

    with phase("measure pruned and base (val, test, MACs, latency)", total=2, unit="model") as p:
        pruned = measure(model, data, dev, shape, latency_repeats)
        p.advance()
        base = measure(base_model, data, dev, shape, latency_repeats)
        p.advance()
    pruned["macs_frac"] = pruned["macs"] / base["macs"]
    pruned["params_frac"] = pruned["params"] / base["params"]
    metrics = {**head, "interrupted": False, "model": spec.to_dict(), "data": data_spec.to_dict(),
               "trial_row": dict(choice.row), "units": UNITS, "base": base, "pruned": pruned, "retrain": run,
               "preprocessing": {"mean": list(data.mean), "std": list(data.std), "note": "inputs are "
                                 "standardised per channel with these statistics of the train split"}}
    saver.save_final(pruned, base, run)
    with phase("export (ONNX, TorchScript)"):
        files = {"model": saver.path, **export_all(model, shape, out, onnx_exporter, metrics, recipe_for(data))}
    write_json(out / FILES["metrics"], metrics, indent=2)
    files["metrics"] = out / FILES["metrics"]
    try:
        plot_widths(out / FILES["widths"], spec, saver.plan, f"trial {choice.trial}: channels kept per group")
        files["widths"] = out / FILES["widths"]
    except Exception as exc:  # noqa: BLE001 - a plot must not lose a retrained model
        log.warning("widths plot failed: %s", exc)
    write_text(out / FILES["summary"], summary_markdown(metrics))
    files["summary"] = out / FILES["summary"]
    log.info("trial %d retrained: val_acc %.4f (in the search %s), test_acc %.4f -> %s", choice.trial,
             pruned["val_acc"], choice.row.get("val_acc"), pruned["test_acc"], out)
    return RetrainResult(out_dir=out, choice=choice, metrics=metrics, files=files)


class _BestSaver:
    """Keeps the best-val-accuracy weights in memory and in ``model.pt`` (rewritten atomically)."""

    def __init__(self, path: Path, model: nn.Module, spec: ModelSpec, plan: Plan, data_spec: DataSpec,
                 extra: dict[str, Any]) -> None:
        self.path, self.model, self.spec, self.plan, self.data_spec = path, model, spec, plan, data_spec
        self.extra = extra
        self.epoch, self.val_acc, self.val_loss, self.state = 0, -math.inf, math.nan, _state(model)
        self.reason = ""

    def offer(self, epoch: int, val_acc: float, val_loss: float = math.nan) -> None:
        """Keep the model's current weights if they beat the kept ones (:func:`prefer_epoch`)."""
        reason = prefer_epoch(val_acc, val_loss, self.val_acc, self.val_loss)
        if reason:
            self.epoch, self.val_acc, self.val_loss, self.state = epoch, val_acc, val_loss, _state(self.model)
            self.reason = reason
            save_pruned(self.path, self.model, self.spec, self.plan, self.data_spec,
                        metrics={"val_acc": val_acc, "epoch": epoch},
                        extra={**self.extra, "retrain": {"best_epoch": epoch, "finished": False}})

    def restore(self) -> None:
        from ..engine.plan import with_metadata

        self.model.load_state_dict(with_metadata(self.state, self.model))

    def save_final(self, pruned: dict[str, Any], base: dict[str, Any], run: dict[str, Any]) -> None:
        metrics = {"val_acc": pruned["val_acc"], "test_acc": pruned["test_acc"], "macs": pruned["macs"],
                   "params": pruned["params"], "base_macs": base["macs"], "base_params": base["params"],
                   "base_val_acc": base["val_acc"], "base_test_acc": base["test_acc"]}
        info = {k: v for k, v in run.items() if k != "history"} | {"finished": True}
        save_pruned(self.path, self.model, self.spec, self.plan, self.data_spec, metrics=metrics,
                    extra={**self.extra, "retrain": info})


def finetune(model: nn.Module, data: Dataset, cfg: TrainConfig, device: torch.device, saver: _BestSaver,
              teacher: nn.Module | None, progress: bool, choice: Choice,
              head: dict[str, Any]) -> dict[str, Any]:
    """fit() keeping the best epoch (epoch 0 = the trial's weights); on Ctrl-C write notes and re-raise."""
    recorded = choice.row.get("val_acc")
    start = evaluate(model, data.val, device)
    start_acc = start["acc"]
    if recorded is not None and abs(start_acc - float(recorded)) > 1e-6:
        log.warning("trial %d: val_acc measured now %.4f differs from the recorded %.4f (other device or "
                    "data?)", choice.trial, start_acc, float(recorded))
    saver.offer(0, start_acc, start["loss"])  # model.pt is usable at once, even if the first epoch is interrupted
    run: dict[str, Any] = {
        "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "schedule": "cosine",
        "augment": cfg.augment, "distill": teacher is not None, "distill_alpha": cfg.distill_alpha,
        "seed": cfg.seed, "device": str(device), "val_acc_start": start_acc, "trial_val_acc": recorded}
    log.info("retraining trial %d (%s) for %d epochs, lr %.3g, batch %d%s on %s", choice.trial, choice.rule,
             cfg.epochs, cfg.lr, cfg.batch_size, " with distillation" if teacher is not None else "", device)
    started = time.perf_counter()

    def on_epoch_end(epoch: int, metrics: dict) -> bool:
        saver.offer(epoch, float(metrics["val_acc"]), float(metrics["val_loss"]))
        return False

    try:
        result = fit(model, data.train, data.val, cfg, device, Callbacks(on_epoch_end=on_epoch_end),
                     teacher=teacher, progress=f"retrain trial {choice.trial}")
    except KeyboardInterrupt:
        run.update(best_epoch=saver.epoch, best_val_acc=saver.val_acc, seconds=time.perf_counter() - started)
        note = (f"interrupted during retraining; {FILES['model']} holds the best epoch so far (epoch "
                f"{saver.epoch}); the test split was not evaluated; re-run retrain with --force to finish (it replaces this model)")
        write_json(saver.path.parent / FILES["metrics"],
                   {**head, "interrupted": True, "note": note, "units": UNITS, "retrain": run,
                    "pruned": {"val_acc": saver.val_acc, "test_acc": None}}, indent=2)
        raise RetrainInterrupted(saver.path.parent, saver.path, saver.epoch, saver.val_acc) from None
    saver.restore()
    history = [{k: h[k] for k in ("epoch", "train_loss", "val_acc", "lr")} for h in result.history]
    run.update(epochs_run=result.epochs_run, best_epoch=saver.epoch, best_val_acc=saver.val_acc,
               best_val_loss=saver.val_loss, best_reason=saver.reason if saver.epoch or not result.epochs_run
               else "no epoch beat the trial's own weights (epoch 0) on val accuracy, then val loss",
               seconds=time.perf_counter() - started, history=history)
    return run


def _check_out(out: Path, force: bool) -> None:
    """Refuse to replace a retrained model (finished, or an interrupted run's best so far) without ``force``;
    an unfinished ``model.pt`` without notes is what a failed or killed run left: it is replaced."""
    if out.exists() and not out.is_dir():
        raise AutopruneError(f"--out {out} is a file; give a folder for the retrained model and its files")
    path = out / FILES["model"]
    if force or not path.exists():
        return
    try:
        finished = bool(read_checkpoint(path).get("extra", {}).get("retrain", {}).get("finished"))
    except (AutopruneError, AttributeError):
        finished = False
    try:
        import json

        interrupted = bool(json.loads((out / FILES["metrics"]).read_text(encoding="utf-8")).get("interrupted"))
    except (OSError, ValueError, AttributeError):
        interrupted = False
    if not finished and not interrupted:
        log.warning("%s holds an unfinished %s that a failed or killed retrain left; replacing it", out,
                    FILES["model"])
        return
    what = "a retrained model" if finished else "the best model so far of an interrupted retrain"
    raise AutopruneError(f"{out} already holds {what} ({FILES['model']}); pass --force to replace it or choose "
                         "another --out")


def export_all(model: nn.Module, shape: tuple[int, int, int], out: Path, onnx_exporter: str,
               metrics: dict[str, Any], recipe: Any = None) -> dict[str, Path]:
    """ONNX and TorchScript files, each checked; a failed export is recorded, not raised."""
    files, metrics["exports"] = {}, {}
    for fmt in ("onnx", "torchscript"):
        try:
            exporter = onnx_exporter if fmt == "onnx" else "auto"
            check = export_checked(model, shape, out / FILES[fmt], fmt, exporter, recipe=recipe)
            metrics["exports"][fmt] = {**check.to_dict(), "path": FILES[fmt]}
            files[fmt] = out / FILES[fmt]
        except AutopruneError as exc:
            log.warning("%s export failed: %s", fmt, exc)
            metrics["exports"][fmt] = {"error": str(exc)}
    return files


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _data_spec(study: Path, ckpt: Mapping[str, Any]) -> DataSpec:
    d = ckpt.get("data")
    if not d:
        spec_file = study / "spec.yaml"
        if spec_file.is_file():
            import yaml

            d = (yaml.safe_load(spec_file.read_text(encoding="utf-8")) or {}).get("data")
    if isinstance(d, str):
        d = {"name": d}
    if not isinstance(d, Mapping):
        raise AutopruneError(f"the trial's checkpoint and {study / 'spec.yaml'} name no data set; cannot "
                             "evaluate the model (re-run the search, which records the data spec)")
    return DataSpec.from_dict(dict(d))


def _load_base(study: Path, spec: ModelSpec, device: torch.device) -> tuple[nn.Module, dict]:
    path = study / "base.pt"
    if not path.is_file():
        raise AutopruneError(f"base model {path} not found; the search writes it: re-run or resume "
                             f"`autoprune search` into {study}")
    model, ckpt = load_base(path, device)
    saved = ModelSpec.from_dict(ckpt["model"])
    if saved != spec:
        raise AutopruneError(f"{path} holds {saved} but the trial was pruned from {spec}; the study folder "
                             "is inconsistent (re-run the search)")
    return model, ckpt


def measure(model: nn.Module, data: Dataset, device: torch.device, shape: tuple[int, int, int],
             repeats: int) -> dict[str, Any]:
    """Val and (the one) test accuracy, MACs, params and CPU latency at batch 1 and 32."""
    val = evaluate(model, data.val, device)
    test = evaluate(model, data.test, device)
    cpu = copy.deepcopy(model).to("cpu", dtype=torch.float32).to(memory_format=torch.contiguous_format).eval()
    latency = {f"batch_{b}": measure_latency(cpu, shape, b, "cpu", repeats=repeats) for b in LATENCY_BATCHES}
    return {"val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"],
            "test_loss": test["loss"],
            "macs": count_macs(cpu, shape), "params": count_params(cpu), "latency_ms": latency}
