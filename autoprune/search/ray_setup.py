"""Setting up the Ray backend: its options, the ``ray`` import, the cluster connection, resources.

No Ray types leave this module and :mod:`autoprune.search.ray_backend`; ``ray`` is imported only
when the backend runs, with an error naming the extra to install when it is missing.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AutopruneError
from .results import one_line

if TYPE_CHECKING:
    from .spec import SearchSpec

log = logging.getLogger(__name__)

INSTALL_HINT = "the ray backend needs the 'ray' extra: pip install 'autoprune[ray]'"
PROBE_TIMEOUT_S = 5.0  # a HOST:PORT that does not answer a TCP connect within this is refused at once


@dataclass(frozen=True)
class RayOptions:
    """Where and how trials run on Ray (no Ray types; the CLI builds it)."""

    address: str | None = None  # None: a local Ray in this process; "auto" or "HOST:PORT": join a cluster
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 1 when the spec's device is cuda (or auto with GPUs), else 0
    max_concurrent: int | None = None  # None: the spec's workers if > 1, else as many as the resources fit

    def __post_init__(self) -> None:
        if not self.cpus_per_trial > 0:
            raise AutopruneError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if self.gpus_per_trial is not None and not self.gpus_per_trial >= 0:
            raise AutopruneError(f"--gpus-per-trial must be >= 0 (e.g. 0.5 to share a GPU), got {self.gpus_per_trial}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise AutopruneError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if self.address is not None and self.address.startswith("ray://"):
            raise AutopruneError(f"--address {self.address}: Ray Client is not supported; run `autoprune search` "
                                 "on a node of the cluster with --address auto")


def require_ray() -> Any:
    """The ``ray`` module, or AutopruneError saying how to install it."""
    try:
        import ray
        import ray.tune
        import ray.tune.search.optuna
    except ImportError:
        raise AutopruneError(INSTALL_HINT) from None
    return ray


def check(out_dir: str | Path, options: RayOptions | None = None) -> None:
    """Before any compute: Ray is installed, ``out_dir`` is not an Optuna-backend search, and a
    ``HOST:PORT`` address answers."""
    require_ray()
    from .ray_store import RAY_DIR
    from .study import STORAGE

    if (Path(out_dir) / STORAGE).exists() and not (Path(out_dir) / RAY_DIR).is_dir():
        raise AutopruneError(f"{out_dir} holds a search run with the optuna backend ({STORAGE}); resume it "
                             "without --backend ray or choose another --out")
    probe(None if options is None else options.address)


def probe(address: str | None) -> None:
    """A ``HOST:PORT`` address must accept a TCP connection within seconds (Ray itself would retry for
    minutes); ``None`` (a local Ray) and ``auto`` (Ray finds the local head) are left to Ray."""
    if address is None or address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise AutopruneError(f"--address {address!r} is not auto or HOST:PORT (e.g. 10.0.0.1:6379)")
    if not 1 <= int(port) <= 65535:
        raise AutopruneError(f"--address {address}: port {port} is not a TCP port (1-65535); Ray's default is 6379")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S) as conn:
            answers = _speaks_grpc(conn)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise AutopruneError(f"could not connect to Ray at {address}: {reason}; start the head node there with "
                             "`ray start --head --port=PORT` or fix --address") from None
    if not answers:
        raise AutopruneError(f"{address} accepts connections but does not answer like a Ray cluster (no gRPC reply "
                             f"within {PROBE_TIMEOUT_S:g} s): another service listens there; give the Ray head's "
                             "GCS address (`ray status` on the head prints it) or start one with `ray start --head`")


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame (RFC 9113, 3.4)


def _speaks_grpc(conn: socket.socket) -> bool:
    """Whether the peer answers an HTTP/2 connection preface with a SETTINGS frame, as Ray's GCS (a gRPC
    server) does; anything else (silence, an HTTP/1 reply, a banner) means another service. Bounded by
    :data:`PROBE_TIMEOUT_S`, so a port held by a non-Ray service is refused in seconds, not after Ray's
    minutes of retries."""
    import time

    deadline = time.monotonic() + PROBE_TIMEOUT_S
    try:
        conn.sendall(_H2_PREFACE + _H2_SETTINGS)
        head = b""
        while len(head) < 9:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:  # timeout, reset
        return False
    return head[3] == 0x04 and head[5:9] == b"\x00\x00\x00\x00"  # type SETTINGS on stream 0


def resources(spec: SearchSpec, options: RayOptions, cluster: Mapping[str, float]) -> tuple[float, float, int]:
    """(cpus, gpus) per trial and the number of concurrent trials, checked against the spec's device."""
    device = str(spec.device)
    gpus = options.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if device.startswith("cuda") or (device == "auto" and cluster.get("GPU", 0) > 0) else 0.0
    if gpus > 0 and device == "cpu":
        raise AutopruneError(f"--gpus-per-trial {gpus} with device cpu: pass --device cuda (or auto)")
    if gpus == 0 and device.startswith("cuda"):
        raise AutopruneError("device cuda needs --gpus-per-trial > 0 with the ray backend (e.g. 1, or 0.5 to share)")
    if gpus > 0 and cluster.get("GPU", 0) < gpus:
        raise AutopruneError(f"the Ray cluster has {cluster.get('GPU', 0):g} GPUs, a trial needs {gpus:g}; "
                             "lower --gpus-per-trial or add GPU nodes")
    cpus = float(options.cpus_per_trial)
    if cluster.get("CPU", 0) < cpus:
        raise AutopruneError(f"the Ray cluster has {cluster.get('CPU', 0):g} CPUs, a trial needs {cpus:g}; "
                             "lower --cpus-per-trial")
    concurrent = options.max_concurrent or (int(spec.workers) if int(spec.workers or 1) > 1 else None)
    if concurrent is None:
        fits = [int(cluster.get("CPU", 0) // cpus)] + ([int(cluster.get("GPU", 0) // gpus)] if gpus > 0 else [])
        concurrent = max(1, min(fits))
    return cpus, gpus, int(concurrent)


def connect(ray: Any, options: RayOptions) -> bool:
    """Connect to (or start) Ray; True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        log.info("using the Ray this process is connected to")
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    # Ray puts the driver's working directory on every worker's import path: start it from an empty
    # private folder, so files in a received study folder (an `autoprune/`, `yaml.py`) are never imported.
    cwd = os.getcwd()
    empty = tempfile.mkdtemp(prefix="autoprune-ray-")
    os.chdir(empty)
    try:
        if options.address is None:
            cpus = os.cpu_count() or 1
            if options.max_concurrent is not None:
                cpus = max(1, math.ceil(options.max_concurrent * options.cpus_per_trial))
            ray.init(num_cpus=cpus, **kwargs)
        else:
            ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise AutopruneError(f"could not connect to Ray at {options.address or 'a new local instance'}: "
                             f"{one_line(exc)}; start a cluster with `ray start --head` or fix "
                             "--address") from None
    finally:
        os.chdir(cwd)
    return True
