"""A full round over real TLS with four heterogeneous devices: the published generalist is exactly
the previous one plus the sample-weighted mean of the deltas."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from edge_runtime.sync_client import Capabilities, SyncError
from sync_service import encoding
from sync_service.config import LocalTrainingConfig, RoundConfig
from sync_service.report import build_status, render_status

from .sync_helpers import StalledUpload, make_delta

# Four devices with different expert counts (E=1 pure generalist ... E=8), all sharing one generalist.
DEVICES = {"phone-a": 1, "pi-b": 2, "jetson-c": 8, "laptop-d": 8}
SAMPLES = {"phone-a": 64, "pi-b": 192, "jetson-c": 128, "laptop-d": 640}


def _expected(
    previous: dict[str, np.ndarray], deltas: dict[str, dict[str, np.ndarray]], weights: dict[str, float]
) -> dict[str, np.ndarray]:
    total = sum(weights.values())
    return {
        name: previous[name]
        + (
            sum(np.float64(weights[d]) * deltas[d][name].astype(np.float64) for d in sorted(deltas)) / total
        ).astype(np.float32)
        for name in previous
    }


def test_four_heterogeneous_devices_publish_the_exact_weighted_average(coordinator_factory) -> None:
    local = LocalTrainingConfig(
        local_steps=10, router_every=30, router_steps=10, expert_lr=2e-3, extra={"k": "v"}
    )
    coordinator = coordinator_factory(
        list(DEVICES), RoundConfig(min_devices=4, round_timeout_s=60, rounds=2, local=local)
    )
    clients = {name: coordinator.client(name) for name in DEVICES}
    deltas = {}
    for index, (name, client) in enumerate(clients.items()):
        manifest = client.register(
            Capabilities(num_experts=DEVICES[name], num_generalists=1, lora_rank=4, runtime="test")
        )
        assert set(manifest) == set(coordinator.generalist)
        task = client.get_task()
        assert (task.action, task.round_id, task.generalist_version) == ("train", 1, 0)
        assert task.local_config["local_steps"] == 10 and task.local_config["router_every"] == 30
        assert task.local_config["expert_lr"] == pytest.approx(2e-3) and task.local_config["extra"] == {
            "k": "v"
        }
        assert task.min_devices == 4 and set(task.accepted_encodings) == {"fp32", "fp16", "int8"}
        generalist = client.download_generalist(task.generalist_version)
        assert generalist.version == 0
        for tensor_name, value in coordinator.generalist.items():
            np.testing.assert_array_equal(generalist.tensors[tensor_name], value)
        deltas[name] = make_delta(index)
        result = client.upload_delta(1, 0, deltas[name], SAMPLES[name])
        assert not result.duplicate and result.round_uploads == index + 1
        client.report_metrics(
            1,
            train_loss=2.5 - index / 10,
            valid_loss=2.7,
            perplexity=14.9,
            step_time_s=0.5,
            peak_memory_bytes=10**9,
            local_steps=10,
            extra={"router_entropy": 0.6},
        )
    coordinator.wait_for(lambda: coordinator.published_version() == 1)

    published = clients["phone-a"].download_generalist()
    assert published.version == 1
    expected = _expected(coordinator.generalist, deltas, {d: float(SAMPLES[d]) for d in DEVICES})
    for name, value in expected.items():
        np.testing.assert_array_equal(published.tensors[name], value, err_msg=name)

    # Round 2 starts from version 1; the task says so.
    task = clients["pi-b"].get_task()
    assert (task.action, task.round_id, task.generalist_version) == ("train", 2, 1)

    store = coordinator.store()
    status = build_status(store)
    store.close()
    assert status["rounds"][1]["state"] == "published" and status["rounds"][1]["uploads"] == 4
    assert {d["device"]: d["capabilities"]["num_experts"] for d in status["devices"]} == DEVICES
    assert status["devices"][0]["last_report"]["extra"] == {"router_entropy": 0.6}
    text = render_status(status)
    assert "published" in text and "jetson-c" in text

    def scrape() -> str:
        url = f"http://127.0.0.1:{coordinator.server.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    # Metrics are updated right after the publication commits: wait for them, do not race them.
    coordinator.wait_for(lambda: 'comigs_sync_rounds_total{outcome="published"} 1.0' in scrape())
    metrics = scrape()
    assert 'comigs_sync_uploads_total{encoding="fp32"} 4.0' in metrics
    assert 'comigs_sync_rounds_total{outcome="published"} 1.0' in metrics
    assert "comigs_sync_aggregation_seconds_count 1.0" in metrics
    assert "comigs_sync_upload_bytes_total" in metrics and "comigs_sync_download_bytes_total" in metrics


def test_mixed_encodings_and_uniform_strategy(coordinator_factory) -> None:
    """fp16 and int8 uploads are averaged after dequantisation; `uniform` ignores sample counts."""
    devices = ["a", "b", "c"]
    coordinator = coordinator_factory(
        devices, RoundConfig(min_devices=3, round_timeout_s=60, rounds=1, strategy="uniform")
    )
    decoded = {}
    for index, (name, enc_name) in enumerate(zip(devices, ["fp32", "fp16", "int8"], strict=True)):
        client = coordinator.client(name)
        delta = make_delta(index, dyadic=False)
        client.upload_delta(1, 0, delta, num_samples=10 ** (index + 1), encoding=enc_name)
        decoded[name] = encoding.decode(encoding.encode(delta, enc_name))  # what the server sees
    coordinator.wait_for(lambda: coordinator.published_version() == 1)
    published = coordinator.client("a").download_generalist(1)
    expected = _expected(coordinator.generalist, decoded, dict.fromkeys(devices, 1.0))
    for name, value in expected.items():
        np.testing.assert_array_equal(published.tensors[name], value, err_msg=name)


def test_norm_clipping_scales_large_updates(coordinator_factory) -> None:
    coordinator = coordinator_factory(
        ["a", "b"], RoundConfig(min_devices=2, round_timeout_s=60, rounds=1, clip_norm=1.0)
    )
    small = {n: np.zeros_like(v) for n, v in coordinator.generalist.items()}
    first = next(iter(small))
    small[first] = small[first].copy()
    small[first].flat[0] = 0.5
    big = {n: np.full_like(v, 0.25) for n, v in coordinator.generalist.items()}
    result_small = coordinator.client("a").upload_delta(1, 0, small, 1)
    result_big = coordinator.client("b").upload_delta(1, 0, big, 1)
    assert not result_small.clipped and result_small.update_norm == pytest.approx(0.5)
    assert result_big.clipped and result_big.update_norm > 1.0
    coordinator.wait_for(lambda: coordinator.published_version() == 1)
    published = coordinator.client("a").download_generalist(1)
    delta = {n: published.tensors[n] - coordinator.generalist[n] for n in small}
    scale = 1.0 / result_big.update_norm
    expected_first = (0.5 + 0.25 * scale) / 2
    assert delta[first].flat[0] == pytest.approx(expected_first, rel=1e-5)
    norm_big_part = np.sqrt(sum(float(np.sum((delta[n] * 2 - small[n]) ** 2)) for n in small))
    assert norm_big_part == pytest.approx(1.0, rel=1e-4)


def test_retry_with_same_key_counts_once_and_key_reuse_is_refused(coordinator_factory, tmp_path) -> None:
    coordinator = coordinator_factory(
        ["a", "b", "c"], RoundConfig(min_devices=3, round_timeout_s=60, rounds=1)
    )
    state = tmp_path / "device-a.json"
    client = coordinator.client("a", state_path=state)
    delta = make_delta(1)
    first = client.upload_delta(1, 0, delta, 5)
    # The device "restarts": a new client reads the persisted key and re-sends; the server dedups.
    again = coordinator.client("a", state_path=state).upload_delta(1, 0, delta, 5)
    assert again.duplicate and again.upload_id == first.upload_id and again.round_uploads == 1
    # A different payload under the same key is refused (the first upload counts).
    other = {n: v + 1 for n, v in delta.items()}
    with pytest.raises(SyncError) as info:
        coordinator.client("a", state_path=state).upload_delta(1, 0, other, 5)
    assert info.value.code.name == "ALREADY_EXISTS" and "first upload counts" in info.value.details
    store = coordinator.store()
    assert store.count_uploads(1) == 1
    store.close()
    task = coordinator.client("a").get_task()
    assert task.action == "wait" and task.already_uploaded and task.uploads_received == 1


def test_one_upload_stream_per_device_at_a_time(coordinator_factory) -> None:
    """A second concurrent upload from the same device is ABORTED (transient): one token, one handler."""
    import grpc

    from sync_service.proto import sync_pb2 as pb

    coordinator = coordinator_factory(["a", "b"], RoundConfig(min_devices=2, round_timeout_s=60, rounds=1))
    stalled = StalledUpload(coordinator, "a", "slow-1")
    try:
        # Probe only once the server holds the first stream (admitted to its upload slot): a probe sent
        # earlier could win the race and make the *first* stream the refused one.
        coordinator.wait_for(lambda: coordinator.server.metrics.registry.get_sample_value(
            "comigs_sync_upload_slots_streaming"
        ) == 1)
        # The probe aims at a round that does not exist, so it could never count if it were let through.
        probe = [pb.UploadDeltaRequest(header=pb.UploadHeader(**{**_fields(stalled.header), "round_id": 99}))]
        with pytest.raises(grpc.RpcError) as info:
            stalled.stub.UploadDelta(iter(probe), metadata=stalled.metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.ABORTED, info.value.details()
        assert "still in progress" in info.value.details()
        stalled.release()
    finally:
        stalled.close()
    assert stalled.result and stalled.result[0].round_uploads == 1


def _fields(message) -> dict:  # type: ignore[no-untyped-def]
    return {field.name: value for field, value in message.ListFields()}
