"""Helpers for the sync tests: test tensors, certificates, in-process and subprocess coordinators.

Nothing of ours is mocked. Servers run either in-process (`SyncServer`, fast, for protocol tests) or as
`python -m sync_service serve` subprocesses (for crash tests that SIGKILL them). The module has a unique
name (not conftest) so test files can import it without clashing with other test directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from edge_runtime import roles
from edge_runtime.agent.certificate import make_certificate
from edge_runtime.sync_client import RetryPolicy, SyncClient
from sync_service import encoding
from sync_service.auth import add_device
from sync_service.config import RoundConfig, ServerConfig
from sync_service.proto import sync_pb2 as pb
from sync_service.proto import sync_pb2_grpc as pb_grpc
from sync_service.server import SyncServer
from sync_service.store import Store

REPO_ROOT = Path(__file__).resolve().parents[2]

#: A miniature 1G1S generalist: 2 layers x (gate, up, down) LoRA, d_model 16, d_ff 32, rank 4.
D_MODEL, D_FF, RANK, LAYERS = 16, 32, 4, 2


def generalist_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(LAYERS):
        for proj, (d_in, d_out) in {
            "gate": (D_MODEL, D_FF),
            "up": (D_MODEL, D_FF),
            "down": (D_FF, D_MODEL),
        }.items():
            prefix = f"model.layers.{layer}.mlp.experts.{proj}_proj"  # as the model code names them
            shapes[f"{prefix}.{roles.GENERALIST_A}"] = (1, RANK, d_in)
            shapes[f"{prefix}.{roles.GENERALIST_B}"] = (1, d_out, RANK)
    return shapes


def make_generalist(seed: int = 0) -> dict[str, np.ndarray]:
    """LoRA-style initial values: A random, B zero (values are dyadic so sums are exact)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in generalist_shapes().items():
        if name.endswith(roles.GENERALIST_A):
            tensors[name] = (rng.integers(-64, 64, size=shape) / 64).astype(np.float32)
        else:
            tensors[name] = np.zeros(shape, np.float32)
    return tensors


def make_delta(seed: int, dyadic: bool = True) -> dict[str, np.ndarray]:
    """A device's delta; dyadic values (k/256) make weighted averages exactly representable."""
    rng = np.random.default_rng(1000 + seed)
    if dyadic:
        return {
            n: (rng.integers(-256, 257, size=s) / 256).astype(np.float32)
            for n, s in generalist_shapes().items()
        }
    return {n: rng.normal(0, 0.01, size=s).astype(np.float32) for n, s in generalist_shapes().items()}


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path
    cert_pem: bytes


def make_tls(directory: Path) -> Tls:
    cert, key = make_certificate(directory, days=1)
    return Tls(cert, key, cert.read_bytes())


FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2)


@dataclass
class Coordinator:
    """A state directory with enrolled devices and a running in-process TLS server."""

    state_dir: Path
    tls: Tls
    tokens: dict[str, str]
    server: SyncServer
    generalist: dict[str, np.ndarray]
    clients: list[SyncClient] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def client(self, device: str, **kwargs: object) -> SyncClient:
        kwargs.setdefault("retry", FAST_RETRY)
        client = SyncClient(
            self.target, self.tokens[device], device_id=device, root_certificates=self.tls.cert_pem, **kwargs
        )  # type: ignore[arg-type]
        self.clients.append(client)
        return client

    def store(self) -> Store:
        return Store(self.state_dir)

    def wait_for(self, predicate, timeout: float = 10.0, interval: float = 0.02) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(interval)
        raise AssertionError("condition not reached in time")

    def published_version(self) -> int:
        store = self.store()
        try:
            return store.latest_generalist().version
        finally:
            store.close()

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.server.stop(0)


def upload_header(payload: bytes, key: str, *, device: str = "", round_id: int = 1) -> pb.UploadHeader:
    """A well-formed fp32 upload header for `payload` (round 1, base version 0, one sample)."""
    return pb.UploadHeader(
        device_id=device,
        round_id=round_id,
        base_version=0,
        num_samples=1,
        encoding=pb.ENCODING_FP32,
        idempotency_key=key,
        total_bytes=len(payload),
        payload_sha256=hashlib.sha256(payload).digest(),
    )


class StalledUpload:
    """An upload stream from `device` that sends its header, then waits for `release()` to send its delta.

    While it stalls, its handler holds the device's one upload stream (and an upload slot); `stub` and
    `metadata` (the same device's channel and token) are there for probing the coordinator meanwhile.
    """

    def __init__(self, coordinator: Coordinator, device: str, key: str) -> None:
        payload = encoding.encode(make_delta(0))
        self.header = upload_header(payload, key, device=device)
        self.metadata = [("authorization", f"Bearer {coordinator.tokens[device]}")]
        self.result: list[pb.UploadDeltaResponse] = []
        self._release, started = threading.Event(), threading.Event()

        def stream():  # type: ignore[no-untyped-def]
            yield pb.UploadDeltaRequest(header=self.header)
            started.set()
            self._release.wait(20)
            yield pb.UploadDeltaRequest(chunk=pb.Chunk(seq=0, offset=0, data=payload))

        self._channel = grpc.secure_channel(
            coordinator.target, grpc.ssl_channel_credentials(coordinator.tls.cert_pem)
        )
        self.stub = pb_grpc.SyncServiceStub(self._channel)
        self._thread = threading.Thread(
            target=lambda: self.result.append(self.stub.UploadDelta(stream(), metadata=self.metadata, timeout=30))
        )
        self._thread.start()
        started.wait(10)

    def release(self) -> None:
        """Send the delta and wait for the acknowledgement (in `result`)."""
        self._release.set()
        self._thread.join(30)

    def close(self) -> None:
        self._release.set()
        self._thread.join(30)
        self._channel.close()


def start_coordinator(
    tmp_path: Path,
    tls: Tls,
    devices: list[str],
    rounds: RoundConfig,
    *,
    generalist_seed: int = 0,
    tick_interval_s: float = 0.02,
    **server_kwargs: object,
) -> Coordinator:
    state_dir = tmp_path / "state"
    generalist = make_generalist(generalist_seed)
    store = Store.initialise(state_dir, generalist)
    tokens = {name: add_device(store, name) for name in devices}
    store.close()
    config = ServerConfig(
        state_dir=state_dir,
        listen="127.0.0.1:0",
        tls_cert=tls.cert,
        tls_key=tls.key,
        metrics_listen="127.0.0.1:0",
        tick_interval_s=tick_interval_s,
        rounds=rounds,
        **server_kwargs,  # type: ignore[arg-type]
    )
    server = SyncServer(config)
    server.start()
    return Coordinator(state_dir, tls, tokens, server, generalist)


class ServerProcess:
    """`python -m sync_service serve` in a subprocess, for tests that must SIGKILL the coordinator."""

    def __init__(
        self,
        state_dir: Path,
        tls: Tls,
        port: int = 0,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.ready_file = state_dir.parent / f"ready-{time.monotonic_ns()}.json"
        self.log_path = log_path or state_dir.parent / "server.log"
        args = [
            sys.executable,
            "-m",
            "sync_service",
            "serve",
            "--state-dir",
            str(state_dir),
            "--listen",
            f"127.0.0.1:{port}",
            "--tls-cert",
            str(tls.cert),
            "--tls-key",
            str(tls.key),
            "--metrics-listen",
            "",
            "--ready-file",
            str(self.ready_file),
            "--tick-interval",
            "0.02",
            *(extra_args or []),
        ]
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(args, cwd=REPO_ROOT, env=full_env, stdout=self._log, stderr=self._log)
        self.port = self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                return int(json.loads(self.ready_file.read_text())["port"])
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log()}")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"server not ready after {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.wait()

    def terminate(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()


class ConnectionCountingRelay:
    """A TCP relay in front of a loopback server that counts the connections clients open and the bytes
    each carries; with `record_path`, it also appends every byte a client sends there.

    `connections` holds, per accepted connection, [bytes the client sent, bytes the server sent];
    `lifetimes`, per connection, [monotonic time accepted, time closed (None while open)].
    Counting accepts is the sure sign of a new connection; a server-side peer address can repeat
    (Linux may hand a loopback client a closed connection's ephemeral port again, tcp_tw_reuse=2).
    """

    def __init__(self, backend_port: int, record_path: Path | None = None) -> None:
        self.connections: list[list[int]] = []
        self.lifetimes: list[list[float | None]] = []
        self.record_path = record_path
        self._record_lock = threading.Lock()
        self._backend = ("127.0.0.1", backend_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def accepted(self) -> int:
        return len(self.connections)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def recorded(self) -> bytes:
        """What clients sent (needs `record_path`)."""
        assert self.record_path is not None
        return self.record_path.read_bytes() if self.record_path.exists() else b""

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            lifetime: list[float | None] = [time.monotonic(), None]
            backend = socket.create_connection(self._backend)
            counts = [0, 0]
            self.connections.append(counts)
            self.lifetimes.append(lifetime)
            for side, (source, sink) in enumerate(((client, backend), (backend, client))):
                threading.Thread(target=self._pump, args=(source, sink, counts, side, lifetime), daemon=True).start()

    def lingered(self, grace_s: float) -> list[tuple[int, float]]:
        """Connections still open more than `grace_s` after a newer one was accepted: (index, seconds)."""
        now = time.monotonic()
        out = []
        for index, (opened, closed) in enumerate(self.lifetimes[:-1]):
            newer = self.lifetimes[index + 1][0]
            assert opened is not None and newer is not None
            overlap = (closed if closed is not None else now) - newer
            if overlap > grace_s:
                out.append((index, round(overlap, 2)))
        return out

    def _pump(
        self, source: socket.socket, sink: socket.socket, counts: list[int], side: int, lifetime: list
    ) -> None:
        try:
            while data := source.recv(65536):
                counts[side] += len(data)
                if side == 0 and self.record_path is not None:
                    with self._record_lock, open(self.record_path, "ab") as f:
                        f.write(data)
                sink.sendall(data)
        except OSError:
            pass
        if lifetime[1] is None:
            lifetime[1] = time.monotonic()
        for end in (source, sink):  # either side's close ends both directions
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()
