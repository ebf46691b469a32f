"""Measuring latency on this machine: runtimes, interleaved timing, layer blocks and the on-disk cache.

The latency model (:mod:`autoprune.engine.latency`) is built from measurements made here. Three
runtimes (:data:`RUNTIMES`):

- ``torch`` on CPU: eager PyTorch, float32, ``threads`` intra-op threads;
- ``torch`` on CUDA: channels-last and the autocast dtype that training and trials use there
  (bfloat16 where supported, else float16; :mod:`autoprune.train`), timed between synchronisations;
- ``onnxruntime`` (CPU): the module exported to ONNX (TorchScript exporter) and run by an ONNX
  Runtime session with ``threads`` intra-op threads; needs the ``export`` extra.

Timing hygiene (NetAdapt, ECCV 2018; HALP, NeurIPS 2022 both measure on the device rather than
predict from MACs): warm-up calls, then ``rounds`` interleaved rounds over all candidates (so load
that drifts on a shared machine hits them alike), each round timing a loop of forwards sized to
about ``budget_s``; a candidate's latency is the median over rounds and its spread the range of the
rounds over that median.

Cache: one JSON file per (device name, host, runtime, threads, batch size, input shape, model
structure) under ``$AUTOPRUNE_CACHE`` or ``~/.cache/autoprune/latency``; the key fields are stored
in the file and checked on load, so a table from another machine or model is never used.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AutopruneError

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")
TABLE_FORMAT = "autoprune.latency/3"  # /2: tables carry misalignment factors; /3: the fit timed in pairs
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU)


@dataclass(frozen=True)
class LatencyConfig:
    """Where and how latency is measured: runtime, device, batch size, threads and the timing effort.

    ``threads`` None means torch's current intra-op thread count. ``points``: grid points per
    varying width of a layer (the table is bilinear between them); ``rounds`` interleaved rounds;
    ``budget_s`` seconds one candidate's loop takes per round. Raises ``AutopruneError`` for an
    unknown runtime, a batch size below 1, onnxruntime without the ``export`` extra or on CUDA.
    """

    runtime: str = "torch"
    device: str = "cpu"
    batch_size: int = 1
    threads: int | None = None
    points: int = 5
    rounds: int = 5
    budget_s: float = 0.02
    cache_dir: str | None = None  # None: $AUTOPRUNE_CACHE or ~/.cache/autoprune/latency
    use_cache: bool = True
    # "wall": wall-clock latency (what a user sees); "cpu": the measuring thread's CPU time, one thread and
    # the CPU only: on a machine shared with other work it leaves out the time the thread waited for a core
    clock: str = "wall"

    def __post_init__(self) -> None:
        check_runtime(self.runtime, self.device)
        if int(self.batch_size) < 1:
            raise AutopruneError(f"latency batch size must be at least 1, got {self.batch_size}")
        if self.threads is not None and int(self.threads) < 1:
            raise AutopruneError(f"latency threads must be at least 1, got {self.threads}")
        if self.points < 2 or self.rounds < 1 or self.budget_s <= 0:
            raise AutopruneError("latency points must be >= 2, rounds >= 1 and budget_s > 0")
        if self.clock not in ("wall", "cpu"):
            raise AutopruneError(f"latency clock {self.clock!r} is unknown; use wall or cpu")
        if self.clock == "cpu" and (self.n_threads != 1 or torch.device(self.device).type != "cpu"):
            raise AutopruneError("latency clock 'cpu' measures one thread on the CPU; use threads=1 or clock 'wall'")

    @property
    def n_threads(self) -> int:
        return int(self.threads) if self.threads is not None else torch.get_num_threads()


def check_runtime(runtime: str, device: str = "cpu") -> None:
    """One-line ``AutopruneError`` for an unknown runtime or onnxruntime that cannot run here."""
    if runtime not in RUNTIMES:
        raise AutopruneError(f"unknown latency runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        if torch.device(device).type != "cpu":
            raise AutopruneError("the onnxruntime latency runtime measures on the CPU; use --device cpu or "
                                 "--runtime torch")
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise AutopruneError("--runtime onnxruntime needs the 'export' extra: pip install "
                                 "'autoprune[export]' (onnx, onnxruntime)") from None


def device_name(device: str | torch.device) -> str:
    """The measuring device's name, with the host: ``"<cpu model> @ <host>"`` or ``"<GPU name> @ <host>"``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return f"{name} @ {platform.node()}"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set torch's intra-op threads to ``n`` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- runtimes


def _amp_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_runner(module: nn.Module, input_shape: Sequence[int], cfg: LatencyConfig) -> Callable[[], Any]:
    """A no-argument callable running one forward of ``module`` on a (batch, *input_shape) input, as
    ``cfg.runtime`` runs it. ``module`` is put in eval mode (and moved, for CUDA)."""
    module = module.eval()
    shape = (int(cfg.batch_size), *(int(s) for s in input_shape))
    dev = torch.device("cpu" if cfg.runtime == "onnxruntime" else cfg.device)
    if any(p.device != dev for p in module.parameters()):  # never move the caller's model
        module = copy.deepcopy(module).to(dev).eval()
    if cfg.runtime == "onnxruntime":
        return _ort_runner(module, shape, cfg.n_threads)
    x = torch.randn(shape)
    if dev.type == "cuda":
        if x.dim() == 4:
            module = module.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.to(dev)
        dtype = _amp_dtype()

        @torch.inference_mode()
        def run_cuda() -> Any:
            with torch.autocast("cuda", dtype=dtype):
                return module(x)

        return run_cuda

    @torch.inference_mode()
    def run_cpu() -> Any:
        return module(x)

    return run_cpu


def _ort_runner(module: nn.Module, shape: tuple[int, ...], threads: int) -> Callable[[], Any]:
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(shape),), buf, dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": torch.randn(shape).numpy()}
    return lambda: sess.run(None, feed)


def _sync(cfg: LatencyConfig) -> None:
    if cfg.runtime == "torch" and torch.device(cfg.device).type == "cuda":
        torch.cuda.synchronize(torch.device(cfg.device))


@dataclass(frozen=True)
class Timing:
    """One candidate's latency: median ms over rounds, the rounds' range over the median, and each round's
    ms (interleaved with the other candidates', so two candidates' rounds pair up)."""

    ms: float
    spread: float  # (max - min) / median over rounds
    rounds: tuple[float, ...] = ()


def time_runners(runners: Sequence[Callable[[], Any]], cfg: LatencyConfig, rounds: int | None = None,
                 budget_s: float | None = None, on_round: Callable[[], None] | None = None) -> list[Timing]:
    """Time every runner in ``rounds`` interleaved rounds (warm-up first); one :class:`Timing` each.

    Each round runs a loop of ``n`` forwards per runner (``n`` sized once so the loop takes about
    ``budget_s``) and records the mean; ``on_round`` is called after each round (progress).
    """
    rounds = rounds or cfg.rounds
    budget = budget_s or cfg.budget_s
    clock = time.thread_time if cfg.clock == "cpu" else time.perf_counter
    with torch_threads(cfg.n_threads):
        loops = []
        for run in runners:
            run()
            _sync(cfg)
            start = clock()
            run()
            _sync(cfg)
            one = max(clock() - start, 1e-6)
            loops.append(int(min(200, max(1, budget / one))))
        per: list[list[float]] = [[] for _ in runners]
        for _ in range(rounds):
            for i, run in enumerate(runners):
                _sync(cfg)
                start = clock()
                for _ in range(loops[i]):
                    run()
                _sync(cfg)
                per[i].append((clock() - start) * 1000.0 / loops[i])
            if on_round is not None:
                on_round()
    out = []
    for t in per:
        med = statistics.median(t)
        out.append(Timing(ms=med, spread=(max(t) - min(t)) / med if med > 0 else 0.0, rounds=tuple(t)))
    return out


# --------------------------------------------------------------------------- layer blocks


@dataclass(frozen=True)
class BlockGeom:
    """A prunable layer as measured: its conv / linear and what follows it, at one input size.

    Two layers with equal BlockGeom share their measurements (ResNet-56 has 57 convs, 9 distinct).
    """

    kind: str  # "conv" | "deconv" | "linear"
    in_ch: int
    out_ch: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    bias: bool
    depthwise: bool
    bn: bool  # a BatchNorm follows (eager torch runs it; ONNX Runtime fuses it)
    act: str  # the activation module that follows, or ""
    input: tuple[int, ...]  # per-sample input shape (C, H, W) or (features,) / (rows, features)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def build(self, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
        """The block with ``cin`` input and ``cout`` output channels, and its per-sample input shape."""
        if self.kind == "linear":
            layers: list[nn.Module] = [nn.Linear(cin, cout, bias=self.bias)]
            return nn.Sequential(*layers), (*self.input[:-1], cin)
        groups = cin if self.depthwise else self.groups
        if self.depthwise:
            cout = cin
        conv_cls = {2: nn.ConvTranspose2d if self.kind == "deconv" else nn.Conv2d,
                    1: nn.ConvTranspose1d if self.kind == "deconv" else nn.Conv1d,
                    3: nn.ConvTranspose3d if self.kind == "deconv" else nn.Conv3d}[len(self.kernel)]
        layers = [conv_cls(cin, cout, self.kernel, self.stride, self.padding, dilation=self.dilation,
                           groups=groups, bias=self.bias)]
        if self.bn:
            layers.append({1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(self.kernel)](cout))
        if self.act:
            layers.append(getattr(nn, self.act)())
        return nn.Sequential(*layers), (cin, *self.input[1:])


def layer_blocks(model: nn.Module, input_shape: Sequence[int]) -> dict[str, list[BlockGeom]]:
    """Per conv / linear layer name, one :class:`BlockGeom` per call in an eval forward of one sample.

    What follows a layer is read from the registration order of modules: a BatchNorm right after a
    conv with as many features is its BN; an activation module right after that BN (or the conv) is
    its activation. Functional activations are not seen; the end-to-end fit absorbs them.
    """
    mods = list(model.named_modules())
    follows: dict[str, tuple[bool, str]] = {}
    for i, (name, m) in enumerate(mods):
        if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        j, bn, act = i + 1, False, ""
        out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if j < len(mods) and isinstance(mods[j][1], nn.modules.batchnorm._BatchNorm) \
                and mods[j][1].num_features == out:
            bn, j = True, j + 1
        if j < len(mods) and isinstance(mods[j][1], ACTIVATIONS):
            act = type(mods[j][1]).__name__
        follows[name] = (bn, act)
    names = {m: n for n, m in mods}
    found: dict[str, list[BlockGeom]] = {}

    def hook(module: nn.Module, inp: tuple, _out: torch.Tensor) -> None:
        name = names[module]
        bn, act = follows[name]
        x = inp[0]
        if isinstance(module, nn.Linear):
            geom = BlockGeom("linear", module.in_features, module.out_features, 1, (), (), (), (),
                             module.bias is not None, False, False, "", tuple(x.shape[1:]))
        else:
            dw = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            geom = BlockGeom("deconv" if module.transposed else "conv", module.in_channels, module.out_channels,
                             module.groups, tuple(module.kernel_size), tuple(module.stride),
                             tuple(module.padding), tuple(module.dilation), module.bias is not None, dw, bn, act,
                             tuple(x.shape[1:]))
        found.setdefault(name, []).append(geom)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=dev))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


# --------------------------------------------------------------------------- cache


def cache_key(cfg: LatencyConfig, input_shape: Sequence[int], structure: str, device: str | None = None) -> dict:
    """The fields a cached table must match: device name (with host), runtime, device type, threads,
    batch size, input shape, model structure, and the torch / table format versions."""
    return {"format": TABLE_FORMAT, "device_name": device or device_name(cfg.device), "runtime": cfg.runtime,
            "device": torch.device(cfg.device).type, "threads": cfg.n_threads, "batch_size": int(cfg.batch_size),
            "input_shape": [int(s) for s in input_shape], "structure": structure, "torch": torch.__version__,
            "points": cfg.points, "clock": cfg.clock}


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir(cfg: LatencyConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("AUTOPRUNE_CACHE") or os.path.join(Path.home(), ".cache", "autoprune")
    return Path(root) / "latency" if not cfg.cache_dir else Path(root)


def load_cached(cfg: LatencyConfig, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cached table for ``key``, or None (absent, unreadable, or made for other key fields)."""
    if not cfg.use_cache:
        return None
    path = cache_dir(cfg) / f"{key_digest(key)}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != dict(key):
        log.info("latency cache %s was made for another device or model; measuring again", path)
        return None
    return data


def save_cached(cfg: LatencyConfig, key: Mapping[str, Any], data: Mapping[str, Any]) -> Path | None:
    """Write the table (best effort: an unwritable cache folder is logged, not fatal)."""
    if not cfg.use_cache:
        return None
    path = cache_dir(cfg) / f"{key_digest(key)}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**data, "key": dict(key)}))
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not write the latency cache %s: %s", path, exc)
        return None
    return path
