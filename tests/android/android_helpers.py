"""Helpers for the JVM conformance tests of android_demo/core against the real Python coordinator.

The Java side is `dev.comigs.edge.harness.ConformanceDevice` (android_demo/jvm/src), compiled once per
session by android_demo/jvm/run_conformance.sh with Debian's JDK, protoc and grpc-java jars. The coordinator
is `python -m sync_service serve` (what `comigs sync serve` runs) in a subprocess, with TLS and device
tokens on a free 127.0.0.1 port, as in tests/sync.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sync_service import encoding as wire
from sync_service.auth import add_device
from sync_service.store import Store

from tests.sync.sync_helpers import REPO_ROOT, ServerProcess, Tls

SCRIPT = REPO_ROOT / "android_demo" / "jvm" / "run_conformance.sh"
MAIN = "dev.comigs.edge.harness.ConformanceDevice"
SKIP_EXIT = 77


def build_jvm_harness() -> tuple[tuple[str, str] | None, str]:
    """Build (or reuse) the harness; returns ((library path, classpath), reason); None: cannot build here."""
    result = subprocess.run(
        ["bash", str(SCRIPT), "--build-only"], capture_output=True, text=True, timeout=900, check=False
    )
    if result.returncode == SKIP_EXIT:
        return None, result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no JDK"
    if result.returncode != 0:
        raise RuntimeError(f"run_conformance.sh --build-only failed ({result.returncode}):\n{result.stderr}")
    library_path, classpath = result.stdout.strip().splitlines()[-2:]
    return (library_path, classpath), ""


@dataclass
class JavaResult:
    returncode: int
    events: list[dict]
    stderr: str
    seconds: float

    def of(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event]


def _events(stdout: str) -> list[dict]:
    events = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


class Jvm:
    """Runs the harness with the built classpath."""

    def __init__(self, library_path: str, classpath: str) -> None:
        self.library_path = library_path
        self.classpath = classpath

    def command(self, *args: str) -> list[str]:
        return [
            "java",
            "-XX:TieredStopAtLevel=1",
            f"-Djava.library.path={self.library_path}",
            "-cp",
            self.classpath,
            MAIN,
            *args,
        ]

    def run(self, *args: str, timeout: float = 120) -> JavaResult:
        started = time.monotonic()
        result = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout, check=False)
        return JavaResult(result.returncode, _events(result.stdout), result.stderr, time.monotonic() - started)

    def start(self, *args: str, log: Path) -> subprocess.Popen:
        handle = open(log, "wb")  # noqa: SIM115 - owned by the process for its lifetime
        return subprocess.Popen(self.command(*args), stdout=subprocess.PIPE, stderr=handle)


def wait_for_event(process: subprocess.Popen, event: str, timeout: float = 60) -> tuple[dict, list[dict]]:
    """Read the process's stdout JSON lines until `event`; returns it and every event read."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    os.set_blocking(process.stdout.fileno(), True)
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"JVM exited ({process.poll()}) before {event!r}; saw {seen}")
        if line.strip().startswith(b"{"):
            item = json.loads(line)
            seen.append(item)
            if item.get("event") == event:
                return item, seen
    raise AssertionError(f"no {event!r} event within {timeout}s; saw {seen}")


def finish(process: subprocess.Popen, timeout: float = 120) -> JavaResult:
    started = time.monotonic()
    out, _ = process.communicate(timeout=timeout)
    return JavaResult(process.returncode, _events(out.decode()), "", time.monotonic() - started)


def sigkill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(30)


@dataclass
class Served:
    """A coordinator subprocess with its state directory and enrolled devices' token files."""

    state_dir: Path
    server: ServerProcess
    token_files: dict[str, Path]
    generalist: dict[str, np.ndarray]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def store(self) -> Store:
        return Store(self.state_dir)

    def token(self, device: str) -> str:
        return self.token_files[device].read_text().strip()

    def wait_published(self, version: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            store = self.store()
            try:
                if store.latest_generalist().version >= version:
                    return
            finally:
                store.close()
            time.sleep(0.05)
        raise AssertionError(f"generalist v{version} not published in {timeout}s:\n{self.server.log()}")

    def generalist_at(self, version: int) -> dict[str, np.ndarray]:
        store = self.store()
        try:
            row = store.get_generalist(version)
            assert row is not None
            with wire.TensorFile(store.root / row.path) as tensors:
                return {name: tensors[name] for name in tensors}
        finally:
            store.close()

    def upload_rows(self, round_id: int) -> dict:
        store = self.store()
        try:
            return {row.device_id: row for row in store.uploads_for_round(round_id)}
        finally:
            store.close()

    def upload_bytes(self, round_id: int, device: str) -> bytes:
        row = self.upload_rows(round_id)[device]
        return (self.state_dir / row.path).read_bytes()

    def close(self) -> None:
        self.server.kill()


def serve(tmp_path: Path, tls: Tls, devices: list[str], generalist: dict[str, np.ndarray], args: list[str]) -> Served:
    state_dir = tmp_path / "state"
    store = Store.initialise(state_dir, generalist)
    token_files = {}
    for name in devices:
        path = tmp_path / f"{name}.token"
        path.write_text(add_device(store, name) + "\n")
        token_files[name] = path
    store.close()
    server = ServerProcess(
        state_dir,
        tls,
        extra_args=["--log-format", "text", "--poll-interval", "0.2", "--keep-uploads", *args],
        log_path=tmp_path / "server.log",
    )
    return Served(state_dir, server, token_files, generalist)


def java_client_args(served: Served, tls: Tls, device: str) -> list[str]:
    return [
        "--target",
        served.target,
        "--device",
        device,
        "--token-file",
        str(served.token_files[device]),
        "--ca",
        str(tls.cert),
    ]


def name_hash(name: str) -> int:
    """DeterministicTrainer.nameHash: sum of UTF-16 code units mod 1000 (names here are ASCII)."""
    return sum(ord(c) for c in name) % 1000


def deterministic_step(name: str, size: int, round_id: int, seed: int) -> np.ndarray:
    """The documented update of the JVM harness's DeterministicTrainer, as float32."""
    j = np.arange(size, dtype=np.int64)
    k = np.mod(name_hash(name) + 7 * j + 13 * round_id + 31 * seed, 513) - 256
    return (k.astype(np.float32) / np.float32(256)).astype(np.float32)


def expected_java_delta(base: dict[str, np.ndarray], round_id: int, seed: int) -> dict[str, np.ndarray]:
    """trained = base + step (float32), delta = trained - base (float32): what the Java device uploads."""
    delta = {}
    for name, value in base.items():
        value = value.astype(np.float32)
        step = deterministic_step(name, value.size, round_id, seed).reshape(value.shape)
        trained = (value + step).astype(np.float32)
        delta[name] = (trained - value).astype(np.float32)
    return delta
