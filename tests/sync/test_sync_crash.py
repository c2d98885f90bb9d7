"""Crash safety: SIGKILL the coordinator at several points of a round, restart it on the same state.

No acknowledged upload may be lost, none may count twice, and the published generalist must be
bit-identical to an uninterrupted run. The server runs as `python -m sync_service serve` in a
subprocess; exact crash instants come from the test-only `COMIGS_SYNC_CRASH_AT` hook (the process
SIGKILLs itself there), plus one kill from outside right after acknowledgements.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from edge_runtime.sync_client import RetryPolicy, SyncClient, SyncError
from sync_service.auth import add_device
from sync_service.config import RoundConfig
from sync_service.faults import ENV_VAR
from sync_service.store import Store

from .sync_helpers import FAST_RETRY, ServerProcess, Tls, make_delta, make_generalist, start_coordinator

DEVICES = ["dev-a", "dev-b", "dev-c", "dev-d"]
SAMPLES = {"dev-a": 100, "dev-b": 300, "dev-c": 50, "dev-d": 550}
SERVE_ARGS = ["--min-devices", "4", "--round-timeout", "120", "--rounds", "1", "--log-format", "text"]
NO_RETRY = RetryPolicy(max_attempts=1)


def _deltas() -> dict[str, dict]:
    return {name: make_delta(i, dyadic=False) for i, name in enumerate(DEVICES)}


@pytest.fixture(scope="module")
def reference_sha(tmp_path_factory: pytest.TempPathFactory, tls: Tls) -> str:
    """The published generalist of an uninterrupted round with the same inputs."""
    coordinator = start_coordinator(
        tmp_path_factory.mktemp("reference"),
        tls,
        DEVICES,
        RoundConfig(min_devices=4, round_timeout_s=120, rounds=1),
    )
    try:
        for name, delta in _deltas().items():
            coordinator.client(name).upload_delta(1, 0, delta, SAMPLES[name])
        coordinator.wait_for(lambda: coordinator.published_version() == 1)
        store = coordinator.store()
        sha = store.get_generalist(1).sha256
        store.close()
        return sha
    finally:
        coordinator.close()


def _init(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    state = tmp_path / "state"
    store = Store.initialise(state, make_generalist(0))
    tokens = {name: add_device(store, name) for name in DEVICES}
    store.close()
    return state, tokens


def _client(
    port: int, tls: Tls, tokens: dict[str, str], name: str, tmp_path: Path, retry: RetryPolicy
) -> SyncClient:
    # The state file makes the client reuse its idempotency key after the "device" restarts too.
    return SyncClient(
        f"127.0.0.1:{port}",
        tokens[name],
        device_id=name,
        root_certificates=tls.cert_pem,
        state_path=tmp_path / f"{name}.json",
        retry=retry,
        rpc_timeout_s=10,
        transfer_timeout_s=20,
    )


def _uploads(state: Path) -> dict[str, str]:
    store = Store(state)
    try:
        return {u.device_id: u.upload_id for u in store.uploads_for_round(1)}
    finally:
        store.close()


def _published_sha(state: Path) -> str | None:
    store = Store(state)
    try:
        row = store.get_generalist(1)
        return row.sha256 if row else None
    finally:
        store.close()


def _upload_all(
    port: int,
    tls: Tls,
    tokens: dict[str, str],
    tmp_path: Path,
    retry: RetryPolicy,
    kill_after: int | None = None,
    server: ServerProcess | None = None,
) -> tuple[dict[str, str], bool]:
    """Upload every device's delta in order; stop at the first failure. Returns (acked uploads, crashed)."""
    acked: dict[str, str] = {}
    deltas = _deltas()
    for name in DEVICES:
        client = _client(port, tls, tokens, name, tmp_path, retry)
        try:
            result = client.upload_delta(1, 0, deltas[name], SAMPLES[name])
        except SyncError as exc:
            assert exc.code.name == "UNAVAILABLE", exc
            return acked, True
        finally:
            client.close()
        acked[name] = result.upload_id
        if kill_after is not None and len(acked) == kill_after:
            assert server is not None
            server.kill()
            return acked, True
    return acked, False


def _wait_published(state: Path, server: ServerProcess, timeout: float = 30.0) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sha = _published_sha(state)
        if sha is not None:
            return sha
        assert server.process.poll() is None, server.log()
        time.sleep(0.05)
    raise AssertionError(f"round 1 was not published: {server.log()}")


SCENARIOS = [
    # (crash point spec or None for an external kill, external kill after n acks, what recovery must clean)
    pytest.param("upload.before_commit:2", None, "orphan_uploads=1", id="file-durable-row-not-committed"),
    pytest.param("upload.after_commit:3", None, "orphan_uploads=0", id="committed-not-acknowledged"),
    pytest.param(None, 2, "orphan_uploads=0", id="sigkill-after-two-acks"),
    pytest.param("aggregate.after_tensor:5", None, "orphan_generalists=0", id="mid-aggregation"),
    pytest.param(
        "publish.before_commit", None, "orphan_generalists=1", id="generalist-written-not-committed"
    ),
]


@pytest.mark.parametrize(("crash_at", "kill_after", "recovered"), SCENARIOS)
def test_sigkill_and_restart_loses_nothing_and_publishes_identical_bytes(
    tmp_path: Path, tls: Tls, reference_sha: str, crash_at: str | None, kill_after: int | None, recovered: str
) -> None:
    state, tokens = _init(tmp_path)
    env = {ENV_VAR: crash_at} if crash_at else {}
    server = ServerProcess(state, tls, env=env, extra_args=SERVE_ARGS, log_path=tmp_path / "run1.log")
    port = server.port
    acked, crashed = _upload_all(port, tls, tokens, tmp_path, NO_RETRY, kill_after, server)
    if not crashed:  # the crash point is in aggregation, after every upload was acknowledged
        assert len(acked) == len(DEVICES)
    assert server.wait() == -signal.SIGKILL, server.log()

    restarted = ServerProcess(state, tls, port=port, extra_args=SERVE_ARGS, log_path=tmp_path / "run2.log")
    try:
        assert recovered in restarted.log()
        durable = _uploads(state)
        for name, upload_id in acked.items():  # every acknowledged upload survived, with its identity
            assert durable[name] == upload_id
        # Devices resume: the same idempotency keys (from their state files) make retries count once.
        final, crashed_again = _upload_all(restarted.port, tls, tokens, tmp_path, FAST_RETRY)
        assert not crashed_again
        for name, upload_id in acked.items():
            assert final[name] == upload_id
        sha = _wait_published(state, restarted)
        assert sha == reference_sha
        store = Store(state)
        uploads = store.uploads_for_round(1)
        round_one = store.get_round(1)
        store.close()
        assert sorted(u.device_id for u in uploads) == DEVICES  # each device exactly once
        assert round_one.state == "published" and round_one.published_version == 1
        assert not any((state / "tmp").iterdir())
    finally:
        restarted.terminate()
    assert "Traceback" not in restarted.log()


def test_sigterm_shuts_down_gracefully_and_restarts(tmp_path: Path, tls: Tls) -> None:
    state, tokens = _init(tmp_path)
    server = ServerProcess(state, tls, extra_args=SERVE_ARGS)
    client = _client(server.port, tls, tokens, "dev-a", tmp_path, FAST_RETRY)
    client.upload_delta(1, 0, _deltas()["dev-a"], 1)
    client.close()
    assert server.terminate() == 0
    assert "coordinator stopped" in server.log()
    again = ServerProcess(state, tls, extra_args=SERVE_ARGS, log_path=tmp_path / "again.log")
    try:
        assert set(_uploads(state)) == {"dev-a"}
    finally:
        assert again.terminate() == 0
