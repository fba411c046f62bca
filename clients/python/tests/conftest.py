"""Fixtures: real Gantry processes (``gantry dev``, coordinators, replica
sets) started from the ``gantry`` binary on loopback, ports chosen by the
kernel, each stopped by its pid at the end; and a TCP proxy whose
connections a test can cut."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

T = TypeVar("T")

WAIT = 30.0


def gantry_bin() -> Path:
    """``GANTRY_BIN``, else the workspace's debug build."""
    explicit = os.environ.get("GANTRY_BIN")
    if explicit:
        return Path(explicit)
    return Path(__file__).resolve().parents[3] / "target" / "debug" / "gantry"


def wait_until(what: str, predicate: Callable[[], T | None], timeout: float = WAIT) -> T:
    """Polls ``predicate`` every 50 ms until it returns something."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Daemon:
    """A ``gantry`` process and the addresses it printed."""

    process: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    grpc: str = ""
    http: str = ""

    def wait_line(self, prefix: str) -> str:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(f"gantry printed no {prefix!r} (exit {self.process.poll()})")

    def stop(self) -> None:
        """SIGINT (Ctrl-C: the dev agent stops its jobs), then SIGKILL."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


class Daemons:
    """Starts ``gantry`` daemons in a temporary directory; stops them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Daemon] = []

    def start(self, name: str, args: list[str]) -> Daemon:
        binary = gantry_bin()
        if not binary.is_file():
            pytest.skip(f"{binary} is not built (cargo build -p gantry)")
        log = (self.root / f"{name}.log").open("w")
        process = subprocess.Popen(
            [str(binary), *args],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
        )
        daemon = Daemon(process)
        self.started.append(daemon)

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                daemon.lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        daemon.grpc = "http://" + daemon.wait_line("listening grpc=")
        daemon.http = "http://" + daemon.wait_line("listening http=")
        return daemon

    def dev(self, name: str = "dev", gpus: str = "2xH100-80GiB") -> Daemon:
        agent = self.root / name / "agent"
        agent.mkdir(parents=True, exist_ok=True)
        # A roomy fake disk: a full build disk must not put the node under
        # disk backpressure.
        (agent / "fake-state.json").write_text(
            json.dumps({"disk_used_bytes": 100 << 30, "disk_total_bytes": 1 << 40})
        )
        daemon = self.start(
            name,
            [
                "dev",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--data-dir",
                str(self.root / name),
                "--fake-gpus",
                gpus,
            ],
        )
        wait_until("a ready node", lambda: _ready_node(daemon.http))
        return daemon

    def stop_all(self) -> None:
        for daemon in reversed(self.started):
            daemon.stop()


def _ready_node(http: str) -> bool | None:
    try:
        nodes = httpx.get(http + "/v1/nodes", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None
    ok = isinstance(nodes, list) and any(n.get("state") == "ready" for n in nodes)
    return True if ok else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    started = Daemons(tmp_path_factory.mktemp("gantry"))
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture(scope="session")
def dev(daemons: Daemons) -> Daemon:
    """One ``gantry dev`` (coordinator + agent with two fake H100s) shared
    by the tests that only need a cluster."""
    return daemons.dev()


class Proxy:
    """A TCP proxy on 127.0.0.1 to ``target``; :meth:`cut` breaks every
    open connection (new ones are still accepted)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("http://").rpartition(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            connections, self.connections = self.connections, []
        for s in connections:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()
