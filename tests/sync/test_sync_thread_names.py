"""The coordinator's threads carry their names at OS level (Linux), so `top -H` and perf can tell them apart."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sync_service.config import RoundConfig
from sync_service.thread_names import MAX_NAME_BYTES, name_current_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names are read from /proc")


def _os_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def _os_names() -> set[str]:
    names = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            names.add((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


def test_name_current_thread_sets_the_kernel_name_cut_to_its_limit() -> None:
    seen: dict[str, str] = {}

    def run(name: str | None, key: str) -> None:
        name_current_thread(name)
        seen[key] = _os_name(threading.get_native_id())

    for name, key in ((None, "default"), ("a-much-longer-name-than-fits", "long")):
        thread = threading.Thread(target=run, args=(name, key), name="probe-thread")
        thread.start()
        thread.join()
    assert seen == {"default": "probe-thread", "long": "a-much-longer-name-than-fits"[:MAX_NAME_BYTES]}


def test_coordinator_handler_and_ticker_threads_are_named(coordinator_factory) -> None:
    coordinator = coordinator_factory(["a"], RoundConfig(min_devices=1))
    credentials = grpc.ssl_channel_credentials(coordinator.tls.cert_pem)
    with grpc.secure_channel(coordinator.target, credentials) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    names = _os_names()
    assert "sync-rounds" in names
    assert any(name.startswith("sync-rpc_") for name in names), sorted(names)
