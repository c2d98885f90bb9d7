"""SyncClient behaviour: TLS, retries only on transient errors, resumable downloads, persisted keys."""

from __future__ import annotations

import json
import socket

import grpc
import numpy as np
import pytest

from edge_runtime.sync_client import RetryPolicy, SyncClient, SyncError
from sync_service.config import RoundConfig
from sync_service.proto import sync_pb2 as pb

from .sync_helpers import make_delta


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_transient_errors_are_retried_with_exponential_backoff(tls) -> None:  # type: ignore[no-untyped-def]
    sleeps: list[float] = []
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, multiplier=2.0)
    client = SyncClient(
        f"127.0.0.1:{_unused_port()}",
        "cmgs1.x.y",
        root_certificates=tls.cert_pem,
        retry=policy,
        rpc_timeout_s=2,
        sleep=sleeps.append,
    )
    with pytest.raises(SyncError) as info:
        client.get_task()
    client.close()
    assert (
        info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.transient and info.value.attempts == 4
    )
    assert len(sleeps) == 3
    for retry, pause in enumerate(sleeps):
        ceiling = min(0.05, 0.01 * 2**retry)
        assert ceiling / 2 <= pause <= ceiling


def test_permanent_errors_are_not_retried(coordinator_factory) -> None:
    coordinator = coordinator_factory(["a"], RoundConfig(min_devices=1))
    sleeps: list[float] = []
    client = SyncClient(
        coordinator.target,
        "cmgs1.0000000000000000." + "A" * 43,
        root_certificates=coordinator.tls.cert_pem,
        sleep=sleeps.append,
    )
    with pytest.raises(SyncError) as info:
        client.get_task()
    client.close()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and info.value.attempts == 1 and not sleeps


def test_tls_with_an_untrusted_certificate_fails(coordinator_factory, other_tls) -> None:  # type: ignore[no-untyped-def]
    coordinator = coordinator_factory(["a"], RoundConfig(min_devices=1))
    client = SyncClient(
        coordinator.target,
        coordinator.tokens["a"],
        root_certificates=other_tls.cert_pem,
        retry=RetryPolicy(max_attempts=1),
        rpc_timeout_s=5,
    )
    with pytest.raises(SyncError) as info:
        client.get_task()
    client.close()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_insecure_channels_only_to_loopback() -> None:
    with pytest.raises(ValueError, match="only loopback"):
        SyncClient("coordinator.example.org:50051", "cmgs1.x.y", insecure=True)
    SyncClient("[::1]:50051", "cmgs1.x.y", insecure=True).close()
    SyncClient("localhost:50051", "cmgs1.x.y", insecure=True).close()


def test_download_resumes_from_an_offset(coordinator_factory) -> None:
    coordinator = coordinator_factory(["a"], RoundConfig(min_devices=1))
    client = coordinator.client("a")
    whole = client.download_generalist(0)
    stub = client._stub  # the raw call the client's resume path makes
    messages = list(
        stub.DownloadGeneralist(
            pb.DownloadGeneralistRequest(version=0, offset=100), metadata=client._metadata, timeout=10
        )
    )
    info = messages[0].info
    tail = b"".join(m.chunk.data for m in messages[1:])
    assert messages[1].chunk.offset == 100 and len(tail) == info.total_bytes - 100
    for name, value in coordinator.generalist.items():
        np.testing.assert_array_equal(whole.tensors[name], value)


def test_idempotency_key_is_persisted_before_upload(coordinator_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    coordinator = coordinator_factory(["a", "b"], RoundConfig(min_devices=2))
    state = tmp_path / "a.json"
    client = coordinator.client("a", state_path=state)
    result = client.upload_delta(1, 0, make_delta(0), 3)
    saved = json.loads(state.read_text())["uploads"]["1"]
    assert saved["acknowledged"] and saved["upload_id"] == result.upload_id and saved["base_version"] == 0
    assert coordinator.client("a", state_path=state)._key_for(1, 0) == saved["key"]
    assert coordinator.client("a", state_path=state)._key_for(2, 0) != saved["key"]


def test_wait_for_task_returns_train_or_times_out(coordinator_factory) -> None:
    coordinator = coordinator_factory(["a", "b"], RoundConfig(min_devices=2, poll_interval_s=0.05))
    client = coordinator.client("a")
    assert client.wait_for_task(timeout_s=5).action == "train"
    client.upload_delta(1, 0, make_delta(0), 3)
    waiting = client.wait_for_task(timeout_s=0.3)
    assert waiting.action == "wait" and waiting.already_uploaded


def test_the_connection_is_closed_after_an_acknowledged_upload(coordinator_factory) -> None:
    """The coordinator keeps ~130-200 KiB of TLS state per connection that carried a delta, until it
    closes: a device hangs up once its upload is acknowledged and reconnects for its next call."""
    coordinator = coordinator_factory(["a", "b"], RoundConfig(min_devices=2, poll_interval_s=0.05))
    client = coordinator.client("a")
    assert client.get_task().action == "train"
    opened = client._channel
    assert opened is not None
    client.upload_delta(1, 0, make_delta(0), 3)
    assert client._channel is None
    with pytest.raises(ValueError, match="closed channel"):
        opened.unary_unary("/comigs.sync.v1.SyncService/GetTask")(b"", timeout=1)
    assert client.get_task().already_uploaded  # a new connection, the same device
    assert client._channel is not None and client._channel is not opened
    client.close()


@pytest.mark.parametrize(
    ("leaf", "role"),
    [("experts.up_proj.specialist_B", "specialist"), ("router.weight", "router"), ("up_proj.weight", "frozen")],
)
def test_only_generalists_leave_the_device(coordinator_factory, leaf, role) -> None:  # type: ignore[no-untyped-def]
    """Whatever the caller passes, a private tensor is refused before a byte is sent."""
    from sync_service import encoding

    coordinator = coordinator_factory(["a"], RoundConfig(min_devices=1, round_timeout_s=60, rounds=1))
    client = coordinator.client("a")
    delta = {**make_delta(0), f"model.layers.0.mlp.{leaf}": np.zeros((2, 2), np.float32)}
    for upload in (
        lambda: client.upload_delta(1, 0, delta, 1),
        lambda: client.upload_encoded(1, 0, encoding.encode(delta, "int8"), 1, encoding="int8"),
    ):
        with pytest.raises(ValueError, match=f"refusing to upload .*{leaf}.* a {role} tensor"):
            upload()
    with pytest.raises(ValueError, match="not an encoded delta|payload"):
        client.upload_encoded(1, 0, b"\x10\x00\x00", 1, encoding="fp32")
    with coordinator.store() as store:
        assert store.count_uploads(1) == 0
    assert client.upload_delta(1, 0, make_delta(0), 1).round_uploads == 1  # the generalists alone go
