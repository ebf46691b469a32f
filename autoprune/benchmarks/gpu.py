"""GPU: the CUDA paths in one short run (training throughput, pruned speed-up, methods, workers, latency).

One process measures, on one GPU, what a search's trials do there (issue 31):

1. training throughput (images/s) of ResNet-56 at 32x32 through ``fit`` as trials call it, data
   on the device: fp32, bf16, fp16 + GradScaler, channels-last on and off, batch 128 and 512;
2. a pruned ResNet-56 (L1 to 0.5 of the MACs) in the same settings: its training and inference
   (batch 1, 32, 256) speed-ups beside its MACs reduction (:mod:`autoprune.benchmarks.gpu_speed`);
3. every method pruning + a 1-epoch fine-tune on the device in bf16 and fp16: completes, finite
   loss, ResRep's fold exact on the device, LRF's features and FSM's moments computed there, the
   device-to-host copies and syncs per step (:mod:`autoprune.benchmarks.gpu_methods`);
4. a search of 8 short trials with 1, 2 and 4 workers sharing the GPU (Optuna; Ray when importable):
   trials per minute, GPU memory per worker, the speed-up of 4 workers over 1
   (:mod:`autoprune.benchmarks.gpu_search`);
5. the latency model and latency-targeted pruning on CUDA, where ``autoprune.engine.latency`` exists.

Each part is guarded: a failure is a row of the status table and the next part runs; the tables
are rewritten after every part, so a run stopped by its time limit keeps what it measured. Parts
share a time budget (``--budget``), split among the parts still to run.

    python -m autoprune.benchmarks.gpu            # full sizes, ~7 min on one H100
    python -m autoprune.benchmarks.gpu --quick    # ~3 min
    python -m autoprune.benchmarks.gpu --dry-run --out /tmp/gpu   # CPU, tiny sizes, seconds: the CI check

On the lent device machine (which lacks optuna and torch-pruning), fetch their wheels here once
with ``bash autoprune/benchmarks/gpu_device.sh fetch``, then give the device tool the command
``bash autoprune/benchmarks/gpu_device.sh run`` with ``carry: [".whl"]``; the tables come back
under ``$OUT`` (copy them to results/benchmarks/).
"""
from __future__ import annotations

import copy
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..search.results import one_line
from . import common

log = logging.getLogger(__name__)

PARTS = ("training", "inference", "methods", "search", "latency")
SHARES = {"training": 0.2, "inference": 0.1, "methods": 0.25, "search": 0.35, "latency": 0.1}


@dataclass(frozen=True)
class Sizes:
    model: str
    image: int
    precisions: tuple[str, ...]
    batches: tuple[int, ...]
    steps: int  # optimizer steps per timed epoch
    timed_epochs: int  # after one warm-up epoch
    infer_batches: tuple[int, ...]
    rounds: int
    round_s: float
    method_images: int
    method_batch: int
    search_images: int
    trials: int
    workers: tuple[int, ...]
    search_epochs: int
    latency_batches: tuple[int, ...]
    latency_points: int
    latency_validate: int
    budget_s: float


FULL = Sizes("resnet56", 32, ("fp32", "bf16", "fp16"), (128, 512), 30, 3, (1, 32, 256), 5, 0.1, 5120, 128,
             6000, 8, (1, 2, 4), 2, (1, 32, 256), 5, 20, 450.0)
QUICK = Sizes("resnet56", 32, ("fp32", "bf16", "fp16"), (128, 512), 10, 2, (1, 32, 256), 3, 0.05, 2560, 128,
              3000, 8, (1, 2, 4), 1, (1, 256), 3, 10, 200.0)
DRY = Sizes("small_cnn", 8, ("fp32", "fp16"), (8,), 2, 1, (1, 8), 1, 0.001, 64, 32, 200, 2, (1,), 1, (1,), 2, 3, 120.0)


class Budget:
    """The run's deadline, shared out among the parts still to run (by ``SHARES``)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds
        self.part_deadline = self.deadline

    def start(self, part: str, remaining: Sequence[str]) -> None:
        left = self.deadline - time.perf_counter()
        share = SHARES[part] / sum(SHARES[p] for p in remaining)
        self.part_deadline = time.perf_counter() + max(0.0, left) * share

    def left(self) -> float:
        return min(self.deadline, self.part_deadline) - time.perf_counter()


def device_lines(device: torch.device, sizes: Sizes, mode: str) -> list[str]:
    """The header: device, software versions, precision flags, the sizes of this run."""
    lines = [(f"Mode: {mode}. Model {sizes.model} at {sizes.image}x{sizes.image}, synthetic data held on the "
             f"device; time budget {sizes.budget_s:.0f} s.")]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        driver = "?"
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10, check=False).stdout.strip() or "?"
        except (OSError, subprocess.SubprocessError):
            pass
        lines.append(f"Device: {p.name} (compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                     f"{p.total_memory / 2**30:.0f} GiB), driver {driver}; torch {torch.__version__}, CUDA "
                     f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; cudnn.allow_tf32="
                     f"{torch.backends.cudnn.allow_tf32}, matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                     f"cudnn.benchmark={torch.backends.cudnn.benchmark}.")
    else:
        lines.append(f"Device: CPU (dry run: tiny sizes, fp32 whatever the precision column says; the numbers "
                     f"only show that every part runs). torch {torch.__version__}.")
    return lines


class Run:
    """The parts' results and the tables written after each part."""

    def __init__(self, args: Any, sizes: Sizes, device: torch.device, name: str, argv: Sequence[str] | None) -> None:
        self.args, self.sizes, self.device, self.name = args, sizes, device, name
        self.command = common.command_line("gpu", argv)
        self.preamble = device_lines(device, sizes, "dry run" if args.dry_run else "quick" if args.quick else "full")
        self.status: list[dict[str, Any]] = []
        self.tables: dict[str, common.Table] = {}
        self.budget = Budget(args.budget or sizes.budget_s)
        self.models: dict[str, Any] = {}

    def guarded(self, part: str, fn: Callable[[], common.Table], remaining: Sequence[str]) -> None:
        self.budget.start(part, remaining)
        start = time.perf_counter()
        row: dict[str, Any] = {"part": part}
        try:
            table = fn()
            self.tables[part] = table
            failed = [r for r in table.rows if any(str(r.get(k, "")).startswith("FAIL") for k in ("checks", "note"))]
            row["status"] = "ok" if not failed else f"ok with {len(failed)} failed row(s)"
        except KeyboardInterrupt:  # Ctrl-C or the wrapper's time limit: keep what the finished parts measured
            row.update(status="interrupted", seconds=time.perf_counter() - start)
            self.status.append(row)
            self.write(echo=False)
            raise
        except Exception as exc:  # the guard's point: record it, run the next part
            log.warning("part %s failed", part, exc_info=True)
            row.update(status="FAILED", note=one_line(exc, 300))
        row["seconds"] = time.perf_counter() - start
        self.status.append(row)
        self.write(echo=False)

    def write(self, echo: bool) -> None:
        status = common.Table("status", "Parts", ("part", "status", "seconds", "note"), tuple(self.status),
                              ("Each part is guarded: a failure is recorded here and the next part runs.",))
        tables = [status] + [self.tables[p] for p in PARTS if p in self.tables]
        common.write_tables(self.name, tables, self.args.out, self.command, self.preamble, echo=echo)


def _base_and_pruned(run: Run) -> tuple[Any, Any, dict[str, Any]]:
    """The base model and its L1 prune to 0.5 of the MACs (cached for the parts that use both)."""
    if "base" not in run.models:
        from ..engine import pruning as engine
        from ..engine.cost import count_macs
        from ..models.registry import ModelSpec, create_model
        from .gpu_speed import synthetic_data

        s = run.sizes
        shape = (3, s.image, s.image)
        torch.manual_seed(0)
        base = create_model(ModelSpec(s.model, 10, 3, s.image))
        calib = synthetic_data(4 * s.batches[0], s.batches[0], shape, run.device)
        pruned = engine.prune(base, "l1", 0.5, data=calib, input_shape=shape, device=run.device).model.cpu()
        macs = (count_macs(base, shape), count_macs(pruned, shape))
        run.models.update(base=base, pruned=pruned, macs=macs)
    base_macs, pruned_macs = run.models["macs"]
    info = {"base MMACs": base_macs / 1e6, "pruned MMACs": pruned_macs / 1e6, "MACs ratio": pruned_macs / base_macs}
    return run.models["base"], run.models["pruned"], info


def _macs_note(info: dict[str, Any], sizes: Sizes) -> str:
    return (f"Pruned: L1 with the default allocation to 0.5 of the MACs: {info['pruned MMACs']:.1f} vs "
            f"{info['base MMACs']:.1f} MMACs per {sizes.image}x{sizes.image} image (ratio {info['MACs ratio']:.3f}, "
            f"so an ideal speed-up of {1 / info['MACs ratio']:.2f}x). Random-initialised weights: speed depends "
            "on shapes only.")


def part_training(run: Run) -> common.Table:
    from .gpu_speed import training_rows

    s = run.sizes
    base, pruned, info = _base_and_pruned(run)
    n = max(s.batches) * s.steps
    g = torch.Generator(device=run.device).manual_seed(0)
    x = torch.randn(n, 3, s.image, s.image, generator=g, device=run.device)
    y = torch.randint(0, 10, (n,), generator=g, device=run.device)
    rows = training_rows([base, pruned], x, y, s.precisions, s.batches, s.steps, s.timed_epochs, run.device,
                         run.budget.left)
    notes = ((f"Images/s through autoprune.train.fit as a trial calls it (data on the device, lr 0.01, no val "
             f"split): {s.steps} steps per epoch, one warm-up epoch, then the median of {s.timed_epochs} timed "
             "epoch(s) (fit's per-epoch seconds, which end in a sync). Base and pruned alternate per setting."),
             _macs_note(info, s), "training speed-up = pruned img/s / base img/s.")
    return common.Table("", "Training throughput (images/s)",
                        ("precision", "channels-last", "batch", "base img/s", "pruned img/s", "training speed-up",
                         "note"), tuple(rows), notes)


def part_inference(run: Run) -> common.Table:
    from .gpu_speed import inference_rows

    s = run.sizes
    base, pruned, info = _base_and_pruned(run)
    rows = inference_rows([base, pruned], (3, s.image, s.image), s.precisions, s.infer_batches, s.rounds,
                          s.round_s, run.device, run.budget.left)
    notes = ((f"Milliseconds per forward of one batch (eval mode, inference_mode, autocast for bf16/fp16), median of "
             f"{s.rounds} alternating rounds of ~{s.round_s:g} s each; device synchronised around each round."),
             _macs_note(info, s), "inference speed-up = base ms / pruned ms.")
    return common.Table("inference", "Inference latency (ms per batch)",
                        ("precision", "channels-last", "batch", "base ms", "pruned ms", "inference speed-up",
                         "base img/s", "note"), tuple(rows), notes)


def part_methods(run: Run) -> common.Table:
    from ..train import TrainConfig, fit
    from .gpu_methods import TARGET, method_rows
    from .gpu_speed import synthetic_data

    s = run.sizes
    base, _, _ = _base_and_pruned(run)
    data = synthetic_data(s.method_images, max(64, s.method_images // 4), (3, s.image, s.image), run.device)
    trained = copy.deepcopy(base)
    fit(trained, data.train, None, TrainConfig(epochs=1, lr=0.05, batch_size=s.method_batch, seed=0), run.device)
    rows = method_rows(trained, data, ("bf16", "fp16"), s.method_batch, run.device, run.budget.left)
    notes = ((f"Base: {s.model} trained 1 epoch on {s.method_images} synthetic images (10 classes, chance 0.10); each "
             f"method prunes it to {TARGET} of the MACs through autoprune.prune (data on the device, the trial's "
             f"TrainConfig: 1 epoch, batch {s.method_batch}, the precision shown; ResRep trains its compactors "
             "for that epoch), then fit fine-tunes 1 epoch with a val split."),
             ("prune DtoH / prune syncs: device-to-host copies and host synchronisations during the whole prune "
             "call; prune blocked / blocked: share of wall time the host sat in synchronisations (torch.profiler; "
             "its overhead makes these upper bounds). DtoH/step and syncs/step: per optimizer step of the "
             "fine-tune, its epoch-end evaluation included. GPU busy: kernel time / wall time of the fine-tune."),
             ("on device: the device type of LRF's feature covariances and of FSM's clipped-Gaussian moments as "
             "computed inside the method; ResRep: the folded model's output vs the compactor model's on one val "
             "batch after a 1-epoch fit with perturbed compactors (pass: fp64 < 1e-9, fp32 < 1e-4; TF32 off for "
             "the check)."))
    return common.Table("methods", "Every method on the device: prune + 1-epoch fine-tune",
                        ("method", "precision", "checks", "MACs kept", "prune s", "prune DtoH", "prune syncs",
                         "prune blocked", "fine-tune loss", "finite", "val acc", "DtoH/step", "syncs/step", "blocked",
                         "GPU busy", "on device"), tuple(rows), notes)


def part_search(run: Run) -> common.Table:
    from .gpu_search import search_rows

    s = run.sizes
    with tempfile.TemporaryDirectory(prefix="autoprune_gpu_search_") as tmp:
        rows = search_rows(Path(tmp), s.model, s.search_images, s.image, s.trials, s.search_epochs,
                           s.method_batch, s.workers, run.args.ray or not run.args.dry_run, run.device,
                           run.budget.left)
    notes = ((f"The same search for each worker count: {s.trials} trials of L1 at random MACs targets in [0.3, 0.7] "
             f"(global allocation), {s.search_epochs} fine-tune epoch(s) each on {s.search_images} synthetic images "
             "(npz, 70 % train, loaded onto the device by each worker), random sampler with seed 0, early stopping "
             "off; Optuna workers are processes sharing the one GPU; Ray: 1/workers GPU per trial."),
             ("trials/min (wall): over the whole search, worker start-up and report included; (running): over the "
             "span from the first trial's start to the last trial's end. mean trials at once: summed trial seconds "
             "/ that span. speed-up: against 1 worker."),
             ("GPU MiB per worker: the largest peak of one process (nvidia-smi, CUDA context included); all "
             "processes: peak of their sum; device MiB used: peak device-wide use minus the use before the search."))
    return common.Table("search", "Trials sharing one GPU",
                        ("backend", "workers", "trials done", "failed", "wall s", "trials/min (wall)",
                         "trials/min (running)", "speed-up (wall)", "speed-up (running)", "mean trials at once",
                         "GPU MiB per worker", "GPU MiB all processes", "device MiB used (delta)", "note"),
                        tuple(rows), notes)


def part_latency(run: Run) -> common.Table:
    from .gpu_search import latency_rows

    s = run.sizes
    rows = latency_rows(s.model, s.image, s.latency_batches, s.latency_points, s.rounds, s.latency_validate,
                        run.device, run.budget.left)
    notes = (("The latency model of the device (autoprune.engine.latency: per-layer tables over widths, "
              f"{s.latency_points} grid points per varying width, {s.rounds} timing rounds, end-to-end fit; built "
              "afresh, no cache) for the base model at each batch size; base ms: measured / predicted per forward."),
             (f"median / p90 error, Spearman: |predicted - measured| / measured on {s.latency_validate} random "
              "held-out width assignments, and the rank correlation of predicted and measured."),
             ("MACs 0.5: L1 + global allocation to 0.5 of the MACs, its measured latency over the base's. "
              "latency-targeted: the same aimed at the latency target (0.5 of the predicted base latency, or 0.1 "
              "above the model's floor, at most 0.95, where narrow layers cannot get below 0.5: launch-bound small "
              "batches; skipped, with a note, when the floor is within 0.02 of 0.95): its "
              "MACs, predicted and measured latency fractions. Latency measured with the latency model's runner "
              "(on CUDA: bf16 autocast, channels-last), interleaved rounds."))
    return common.Table("latency", "Latency model and latency-targeted pruning",
                        ("batch", "build s", "base ms", "base ms predicted", "median error", "p90 error", "Spearman",
                         "MACs 0.5: latency frac", "latency target", "latency-targeted: MACs frac",
                         "predicted latency frac", "measured latency frac", "note"), tuple(rows), notes)


FUNCTIONS = {"training": part_training, "inference": part_inference, "methods": part_methods,
             "search": part_search, "latency": part_latency}


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="the whole script on the CPU with tiny sizes (seconds; writes gpu_dry_run.md)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or auto (default); cpu only with --dry-run")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 450; --quick 200)")
    p.add_argument("--ray", action="store_true", help="with --dry-run: also run the search part on Ray")
    args = p.parse_args(argv)
    common.setup(args)
    from ..train import resolve_device

    device = torch.device("cpu") if args.dry_run else resolve_device(args.device)
    if device.type != "cuda" and not args.dry_run:
        print("error: no CUDA GPU here; this benchmark measures one. Use --dry-run to run the whole script on "
              "the CPU with tiny sizes", file=sys.stderr)
        return 2
    sizes = DRY if args.dry_run else QUICK if args.quick else FULL
    run = Run(args, sizes, device, "gpu_dry_run" if args.dry_run else "gpu", argv)
    try:
        for i, part in enumerate(args.parts):
            run.guarded(part, lambda part=part: FUNCTIONS[part](run), args.parts[i:])
    except KeyboardInterrupt:
        print(f"interrupted: the parts that finished are in {Path(args.out) / run.name}.md", file=sys.stderr)
        return 130
    run.write(echo=True)
    return 0 if all(r["status"] == "ok" for r in run.status) else 1


if __name__ == "__main__":
    raise SystemExit(main())
