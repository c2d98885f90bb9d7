"""Helpers of the device-agent tests: a tiny model on disk, device data, a real coordinator process,
agent processes and a TCP proxy that records every byte an agent sends.

Nothing of ours is mocked: the coordinator is `python -m sync_service serve` and every agent is
`python -m edge_runtime.cli edge run`, all on 127.0.0.1 with free ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file

from edge_runtime import roles
from edge_runtime.agent.loop import build_device_model
from edge_runtime.agent.state import StateDir
from sync_service.auth import add_device
from sync_service.store import Store

from tests.builders import synthetic_language, tiny_base
from tests.sync.sync_helpers import ConnectionCountingRelay

REPO_ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 16
RANK = 4
AGENT_SEED = 7  # every test agent's --seed (specialist/router init and data sampling)


def save_tiny_model(directory: Path) -> Path:
    """A 2-layer random Llama as a Hugging Face directory, loadable with `--model DIR`."""
    tiny_base("llama", seed=0).save_pretrained(directory)
    return directory


def make_device_data(directory: Path, seed: int, n_train: int = 3000, n_valid: int = 800) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, n, offset in (("train", n_train, 0), ("valid", n_valid, 100), ("test", 600, 200)):
        np.save(directory / f"{name}.npy", synthetic_language(n, seed=seed * 1000 + offset))
    return directory


def initial_generalist(model_dir: Path, experts: str = "1,1") -> dict[str, np.ndarray]:
    """The common starting generalist every device downloads (what `comigs sync init` gets)."""
    model = build_device_model(str(model_dir), experts, RANK, seed=12345)
    return {n: t.numpy() for n, t in roles.generalist_state(model).items()}


def initial_private(model_dir: Path, experts: str, seed: int = AGENT_SEED) -> dict[str, torch.Tensor]:
    """A device's specialists and routers as its agent initialises them (same seed, same code)."""
    model = build_device_model(str(model_dir), experts, RANK, seed)
    return roles.state_by_role(model, roles.Role.SPECIALIST, roles.Role.ROUTER)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class CoordinatorProcess:
    """`python -m sync_service serve` on 127.0.0.1 (TLS unless insecure), devices enrolled beforehand."""

    state_dir: Path
    tokens: dict[str, str]
    process: subprocess.Popen
    port: int
    log_path: Path
    _log: Any = field(repr=False, default=None)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def store(self) -> Store:
        return Store(self.state_dir)

    def generalist(self, version: int) -> dict[str, np.ndarray]:
        store = self.store()
        try:
            row = store.get_generalist(version)
            assert row is not None, f"generalist v{version} not published"
            return load_file(str(store.root / row.path))
        finally:
            store.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log:
            self._log.close()


def start_coordinator(root: Path, generalist: dict[str, np.ndarray], devices: list[str], *, tls: Any = None,
                      args: list[str] | None = None) -> CoordinatorProcess:
    state_dir = root / "coordinator"
    store = Store.initialise(state_dir, generalist)
    tokens = {name: add_device(store, name) for name in devices}
    store.close()
    ready = root / "coordinator-ready.json"
    log_path = root / "coordinator.log"
    command = [sys.executable, "-m", "sync_service", "serve", "--state-dir", str(state_dir), "--listen",
               "127.0.0.1:0", "--metrics-listen", "", "--ready-file", str(ready), "--tick-interval", "0.05",
               "--poll-interval", "0.1", "--keep-uploads", *(args or [])]
    command += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)] if tls else ["--insecure"]
    log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"coordinator did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    port = int(json.loads(ready.read_text())["port"])
    return CoordinatorProcess(state_dir, tokens, process, port, log_path, log)


def agent_command(target: str, token: str, data: Path, state_dir: Path, model_dir: Path | None, *,
                  experts: str = "1,1", tls: Any = None, extra: list[str] | None = None) -> list[str]:
    command = [sys.executable, "-m", "edge_runtime.cli", "edge", "run", "--coordinator", target, "--token", token,
               "--data", str(data), "--state-dir", str(state_dir), "--experts", experts, "--rank", str(RANK),
               "--seq-len", str(SEQ_LEN), "--seed", str(AGENT_SEED), "--threads", "1", "--retries", "4",
               "--retry-backoff", "0.1", *(extra or [])]
    if model_dir is not None:
        command += ["--model", str(model_dir)]
    command += ["--ca-file", str(tls.cert)] if tls else ["--insecure"]
    return command


def start_agent(command: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps its own descriptor
    try:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def agent_state(state_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(record, trainable tensors) of an agent's state directory, verified like the agent does."""
    from safetensors.torch import load

    state = StateDir(state_dir)
    record = state.load()
    assert record is not None, f"{state_dir} holds no committed state"
    return record, load(state.read_blob("tensors"))


#: A TCP proxy that appends every byte the client sends to its record file and counts, per connection,
#: the bytes each side sent: the sync tests' relay with a record path.
RecordingProxy = ConnectionCountingRelay


def value_windows(tensor: torch.Tensor) -> list[bytes]:
    """Every pair of consecutive float32 values of `tensor` as 8 raw bytes, skipping all-zero pairs."""
    raw = tensor.detach().contiguous().float().numpy().tobytes()
    out = []
    for i in range(0, len(raw) - 7, 4):
        window = raw[i:i + 8]
        if window != b"\0" * 8:
            out.append(window)
    return out


@dataclass
class InProcessCoordinator:
    """An in-process TLS `SyncServer` (fast start) for tests that need no coordinator process."""

    state_dir: Path
    tokens: dict[str, str]
    server: Any

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def close(self) -> None:
        self.server.stop(0)


def inprocess_coordinator(root: Path, generalist: dict[str, np.ndarray], devices: list[str], tls: Any, *,
                          rounds: int = 1, local_steps: int = 4, batch_size: int = 2, router_every: int = 2,
                          router_steps: int = 1) -> InProcessCoordinator:
    from sync_service.config import LocalTrainingConfig, RoundConfig, ServerConfig
    from sync_service.server import SyncServer

    state_dir = root / "coordinator"
    store = Store.initialise(state_dir, generalist)
    tokens = {name: add_device(store, name) for name in devices}
    store.close()
    local = LocalTrainingConfig(local_steps=local_steps, router_every=router_every, router_steps=router_steps,
                                batch_size=batch_size)
    config = ServerConfig(state_dir=state_dir, listen="127.0.0.1:0", tls_cert=tls.cert, tls_key=tls.key,
                          metrics_listen=None, tick_interval_s=0.05, keep_uploads=True,
                          rounds=RoundConfig(min_devices=len(devices), rounds=rounds, poll_interval_s=0.1,
                                             round_timeout_s=120, local=local))
    server = SyncServer(config)
    server.start()
    return InProcessCoordinator(state_dir, tokens, server)


def agent_options(target: str, token: str, data: Path, state_dir: Path, tls: Any, **kwargs: Any) -> Any:
    """AgentOptions for an in-process `DeviceAgent` with the test defaults of `agent_command`."""
    from edge_runtime.agent.loop import AgentOptions

    defaults: dict[str, Any] = dict(experts="1,1", rank=RANK, seq_len=SEQ_LEN, seed=AGENT_SEED, retries=3,
                                    retry_backoff_s=0.05, ca_file=tls.cert if tls else None, insecure=tls is None,
                                    quiet=True)
    defaults.update(kwargs)
    return AgentOptions(coordinator=target, token=token, data=data, state_dir=state_dir, **defaults)
