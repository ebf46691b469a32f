"""A Ray address where another service listens is refused within seconds (issue 30, item 4): the probe
expects the HTTP/2 SETTINGS reply of Ray's GCS (a gRPC server); fake services on 127.0.0.1 that stay
silent, speak HTTP/1, echo, or send a banner are each refused in one line, well within 30 s."""
from __future__ import annotations

import socket
import threading
import time

import pytest
from test_faults import one_line, write_spec

from autoprune.cli import main

pytest.importorskip("ray")


class FakeService:
    """A TCP server on 127.0.0.1 that answers every connection with ``behaviour``."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            try:
                if self.behaviour == "banner":
                    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                elif self.behaviour in ("http", "echo"):
                    data = conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" if self.behaviour == "http"
                                 else data)
            except OSError:
                pass  # "silent": accept and never answer

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.mark.parametrize("behaviour", ["silent", "http", "echo", "banner"])
def test_a_non_ray_service_is_refused_within_30_seconds(behaviour, tmp_path, capsys):
    service = FakeService(behaviour)
    try:
        spec = write_spec(tmp_path, None)
        start = time.monotonic()
        code = main(["search", str(spec), "--out", str(tmp_path / "out"), "--backend", "ray", "--address",
                     f"127.0.0.1:{service.port}", "--no-progress"])
        took = time.monotonic() - start
    finally:
        service.close()
    assert code == 2 and took < 30, took
    one_line(capsys, f"127.0.0.1:{service.port}", "does not answer like a Ray cluster")
    assert not (tmp_path / "out").exists()  # refused before the results folder is made


@pytest.mark.parametrize("address,needle", [("127.0.0.1:99999", "not a TCP port"), ("127.0.0.1:0", "not a TCP port"),
                                            ("nohost", "not auto or HOST:PORT")])
def test_a_malformed_address_is_named(address, needle, tmp_path, capsys):
    spec = write_spec(tmp_path, None)
    assert main(["search", str(spec), "--out", str(tmp_path / "out"), "--backend", "ray", "--address", address,
                 "--no-progress"]) == 2
    one_line(capsys, needle)
