"""android_demo/core on the JVM against the real coordinator (`python -m sync_service serve`), TLS + tokens.

The Java device runs the app's device logic (round loop, sync client, encodings, durable state) with the
harness's DeterministicTrainer, a documented update instead of ExecuTorch, so every number it uploads can
be predicted here exactly.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.sync_client import Capabilities, SyncClient
from sync_service import encoding as wire
from sync_service.aggregation import aggregate

from .android_helpers import (
    Jvm,
    expected_java_delta,
    finish,
    java_client_args,
    serve,
    sigkill,
    wait_for_event,
)
from tests.sync.sync_helpers import FAST_RETRY, ConnectionCountingRelay, Tls, make_delta, make_generalist

JAVA = "java-phone"


def _python_device(served, tls: Tls, name: str, samples: int, rounds: int, errors: list, seed: int) -> None:
    """A Python device using edge_runtime.sync_client.SyncClient directly."""
    try:
        client = SyncClient(
            served.target, served.token(name), device_id=name, root_certificates=tls.cert_pem, retry=FAST_RETRY
        )
        with client:
            client.register(Capabilities(num_experts=1, runtime="python-test"))
            uploaded = 0
            deadline = time.monotonic() + 90
            while uploaded < rounds and time.monotonic() < deadline:
                task = client.wait_for_task(timeout_s=30, max_poll_s=0.2)
                if task.action == "done":
                    return
                if task.action != "train" or task.already_uploaded:
                    time.sleep(0.1)
                    continue
                client.download_generalist(task.generalist_version)
                delta = make_delta(seed * 10 + task.round_id, dyadic=False)
                client.upload_delta(task.round_id, task.generalist_version, delta, samples)
                uploaded += 1
            assert uploaded == rounds, f"{name} uploaded {uploaded} of {rounds} rounds"
    except BaseException as exc:  # reported by the test thread
        errors.append((name, exc))


def test_java_and_two_python_devices_complete_two_rounds(jvm: Jvm, android_tls: Tls, tmp_path: Path) -> None:
    samples = {JAVA: 200, "py-a": 100, "py-b": 300}
    served = serve(
        tmp_path,
        android_tls,
        list(samples),
        make_generalist(0),
        ["--min-devices", "3", "--round-timeout", "60", "--rounds", "2", "--strategy", "fedavg"],
    )
    try:
        java = jvm.start(
            "run",
            *java_client_args(served, android_tls, JAVA),
            "--state",
            str(tmp_path / "java" / "state.json"),
            "--rounds",
            "2",
            "--encoding",
            "fp32,int8",
            "--seed",
            "5",
            "--samples",
            str(samples[JAVA]),
            "--idle-timeout-ms",
            "60000",
            log=tmp_path / "java.log",
        )
        errors: list = []
        threads = [
            threading.Thread(target=_python_device, args=(served, android_tls, name, samples[name], 2, errors, i))
            for i, name in enumerate(["py-a", "py-b"], start=1)
        ]
        for thread in threads:
            thread.start()
        result = finish(java, timeout=120)
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        assert result.returncode == 0, (result.events, (tmp_path / "java.log").read_text())
        assert [e["round"] for e in result.of("uploaded")] == [1, 2]
        served.wait_published(2)

        for round_id, encoding in ((1, "fp32"), (2, "int8")):
            base = served.generalist_at(round_id - 1)
            rows = served.upload_rows(round_id)
            assert set(rows) == set(samples)
            assert rows[JAVA].encoding == encoding and rows[JAVA].num_samples == samples[JAVA]
            # The Java device's stored upload is byte for byte what Python would encode for the
            # documented update: trained = base + step, delta = trained - base, in float32.
            java_delta = expected_java_delta(base, round_id, seed=5)
            assert served.upload_bytes(round_id, JAVA) == wire.encode(java_delta, encoding)
            # The published generalist is the fedavg of the three stored uploads, weights = samples.
            updates = [(wire.decode(served.upload_bytes(round_id, device)), samples[device]) for device in sorted(rows)]
            mean = aggregate("fedavg", updates)
            published = served.generalist_at(round_id)
            for name, value in base.items():
                np.testing.assert_allclose(published[name], value + mean[name], rtol=0, atol=1e-6)
            # ... and the Java delta is in it with weight 200/600: without it the result differs.
            name = sorted(base)[0]
            others = [u for device, u in zip(sorted(rows), updates, strict=True) if device != JAVA]
            weighted = sum(u[0][name].astype(np.float64) * u[1] for u in others)
            java_part = wire.decode(served.upload_bytes(round_id, JAVA))[name].astype(np.float64) * 200
            np.testing.assert_allclose(mean[name], (weighted + java_part) / 600, rtol=0, atol=1e-6)
    finally:
        served.close()


@pytest.mark.parametrize("point", ["before_upload", "after_ack"])
def test_killed_java_device_resumes_without_duplicate(jvm: Jvm, android_tls: Tls, tmp_path: Path, point: str) -> None:
    """SIGKILL the JVM after it persisted its key (before sending / after the coordinator acknowledged)."""
    served = serve(
        tmp_path,
        android_tls,
        [JAVA, "py-a"],
        make_generalist(0),
        ["--min-devices", "2", "--round-timeout", "60", "--rounds", "1"],
    )
    state = tmp_path / "java" / "state.json"
    args = [*java_client_args(served, android_tls, JAVA), "--state", str(state), "--rounds", "1", "--seed", "3"]
    try:
        java = jvm.start("run", *args, "--pause-at", point, "--pause-ms", "120000", log=tmp_path / "java1.log")
        persisted, _ = wait_for_event(java, "key_persisted")
        wait_for_event(java, "paused")
        sigkill(java)
        saved = json.loads(state.read_text())
        entry = saved["uploads"]["1"]
        assert entry["key"] == persisted["key"] and entry["acknowledged"] is False
        rows = served.upload_rows(1)
        assert (JAVA in rows) == (point == "after_ack")

        restarted = jvm.run("run", *args)
        assert restarted.returncode == 0, (restarted.events, restarted.stderr)
        assert [e["key"] for e in restarted.of("resume_upload")] == [persisted["key"]]
        assert not restarted.of("training"), "a restarted device must re-send, not retrain"
        (ack,) = restarted.of("uploaded")
        assert ack["duplicate"] is (point == "after_ack")

        client = SyncClient(
            served.target,
            served.token("py-a"),
            device_id="py-a",
            root_certificates=android_tls.cert_pem,
            retry=FAST_RETRY,
        )
        with client:
            client.upload_delta(1, 0, make_delta(1), 100)
        served.wait_published(1)
        rows = served.upload_rows(1)
        assert sorted(rows) == [JAVA, "py-a"]  # one upload per device: counted once
        assert rows[JAVA].idempotency_key == persisted["key"]
        assert served.upload_bytes(1, JAVA) == wire.encode(expected_java_delta(served.generalist_at(0), 1, 3), "fp32")
        final = json.loads(state.read_text())["uploads"]["1"]
        assert final["acknowledged"] is True and final["key"] == persisted["key"]
        assert not (state.parent / entry["payload_file"]).exists()  # cleaned up after the acknowledgement
    finally:
        served.close()


def test_java_device_hangs_up_while_training_and_after_every_upload(jvm: Jvm, android_tls: Tls, tmp_path: Path) -> None:
    """The Java device closes its connection (`SyncClient.hangUp`) before it trains and once an upload is
    acknowledged, so the coordinator keeps no TLS state for it while it trains or waits for the next
    round; its next call reconnects. Counted at a TCP relay: one JVM process, three rounds, at least two
    connections per round (task + download, then slot + upload; a client that kept its connection
    while training would open one per round), and none left open beside the next one (grpc-java's
    `enterIdle()` left them open ~5 s)."""
    rounds = 3
    served = serve(tmp_path, android_tls, [JAVA], make_generalist(0),
                   ["--min-devices", "1", "--round-timeout", "60", "--rounds", str(rounds)])
    relay = ConnectionCountingRelay(served.server.port)
    args = java_client_args(served, android_tls, JAVA)
    args[args.index("--target") + 1] = f"127.0.0.1:{relay.port}"  # through the relay
    try:
        result = jvm.run("run", *args, "--state", str(tmp_path / "java" / "state.json"), "--rounds", str(rounds),
                         "--seed", "1", "--idle-timeout-ms", "60000")
        assert result.returncode == 0, (result.events, result.stderr)
        assert [e["round"] for e in result.of("uploaded")] == list(range(1, rounds + 1))
        assert relay.accepted >= 2 * rounds, f"{relay.accepted} connection(s) for {rounds} rounds"
        assert not relay.lingered(0.5), f"(connection, seconds) open beside a newer one: {relay.lingered(0.5)}"
    finally:
        relay.close()
        served.close()


def test_java_device_refused_at_the_connection_limit_reconnects_afresh(
    jvm: Jvm, android_tls: Tls, tmp_path: Path
) -> None:
    """The coordinator closes connections beyond --max-connections as they arrive. The Java client then
    drops its channel (SyncClient.hangUp on UNAVAILABLE), so every retry opens a new connection after
    the client's own short backoff; a channel kept would fail fast, opening nothing, until grpc-java's
    reconnect backoff had passed (0.8-1.2 s, then 1.6x longer each time), and get in seconds late. Its
    own hang-ups (while it trains) must really close its connection, or at a limit of two its next
    call is refused because of itself."""
    served = serve(tmp_path, android_tls, [JAVA, "py-a", "py-b"], make_generalist(0),
                   ["--min-devices", "1", "--round-timeout", "60", "--rounds", "1",
                    "--upload-slots", "1", "--max-connections", "2"])
    held = [SyncClient(served.target, served.token(name), device_id=name, root_certificates=android_tls.cert_pem)
            for name in ("py-a", "py-b")]
    relay = ConnectionCountingRelay(served.server.port)
    args = java_client_args(served, android_tls, JAVA)
    args[args.index("--target") + 1] = relay.target
    java = None
    try:
        for client in held:
            client.get_task()  # two connections held open: the coordinator is at its limit
        java = jvm.start("run", *args, "--state", str(tmp_path / "java" / "state.json"), "--rounds", "1",
                         "--initial-backoff-ms", "100", "--max-backoff-ms", "100", "--max-attempts", "100",
                         "--idle-timeout-ms", "60000", log=tmp_path / "java.log")
        first_refusal = _when(lambda: relay.accepted >= 1, timeout=60)  # includes the JVM's start
        fourth = _when(lambda: relay.accepted >= 4, timeout=10)
        assert fourth - first_refusal < 2.0, f"4 connections took {fourth - first_refusal:.2f} s"
        held[0].close()  # a connection frees
        freed = time.monotonic()
        wait_for_event(java, "registered", timeout=30)
        assert time.monotonic() - freed < 1.5, f"got in {time.monotonic() - freed:.2f} s after a connection freed"
        result = finish(java, timeout=60)
        java = None
        assert result.returncode == 0, (result.events, result.stderr)
        assert [e["round"] for e in result.of("uploaded")] == [1]
        assert not relay.lingered(0.5), f"(connection, seconds) open beside a newer one: {relay.lingered(0.5)}"
    finally:
        if java is not None:
            sigkill(java)
        for client in held:
            client.close()
        relay.close()
        served.close()


def _when(condition, timeout: float) -> float:
    """The monotonic time at which `condition()` first held (polled every 5 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.005)
    return time.monotonic()
