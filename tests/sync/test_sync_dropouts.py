"""Devices that go silent block nobody: rounds close at their deadline with a quorum, late uploads get
FAILED_PRECONDITION, and a round without quorum is extended, then failed with a recorded reason."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge_runtime.sync_client import SyncError
from sync_service.config import RoundConfig
from sync_service.report import build_status

from .sync_helpers import make_delta

DEVICES = [f"dev{i:02d}" for i in range(10)]
SILENT = {"dev02", "dev05", "dev08"}  # 30 % of the fleet never uploads
ROUND_TIMEOUT = 1.5


def test_rounds_complete_at_deadline_with_30_percent_dropouts(coordinator_factory) -> None:
    coordinator = coordinator_factory(
        DEVICES,
        RoundConfig(
            min_devices=5, round_timeout_s=ROUND_TIMEOUT, max_extensions=0, rounds=2, poll_interval_s=0.1
        ),
    )
    clients = {name: coordinator.client(name) for name in DEVICES}
    for round_id in (1, 2):
        task = clients["dev00"].get_task()
        assert task.action == "train" and task.round_id == round_id
        opened = time.time()
        deltas = {}
        for index, name in enumerate(DEVICES):
            if name in SILENT:
                continue
            deltas[name] = make_delta(10 * round_id + index)
            clients[name].upload_delta(round_id, task.generalist_version, deltas[name], num_samples=index + 1)
        # 7 of 10 uploaded: the round must wait for its deadline (not close early), then publish.
        assert clients["dev00"].get_task().already_uploaded
        coordinator.wait_for(
            lambda r=round_id: coordinator.published_version() == r, timeout=ROUND_TIMEOUT + 10
        )
        assert time.time() - opened >= ROUND_TIMEOUT - 0.2
        published = clients["dev01"].download_generalist(round_id)
        previous = clients["dev01"].download_generalist(round_id - 1)
        weights = {name: DEVICES.index(name) + 1 for name in deltas}
        total = sum(weights.values())
        for tensor in previous.tensors:
            mean = (
                sum(np.float64(weights[d]) * deltas[d][tensor].astype(np.float64) for d in sorted(deltas))
                / total
            )
            np.testing.assert_array_equal(
                published.tensors[tensor], previous.tensors[tensor] + mean.astype(np.float32)
            )
        # A silent device wakes up after the deadline: its upload is late, clearly.
        with pytest.raises(SyncError) as info:
            clients["dev05"].upload_delta(round_id, task.generalist_version, make_delta(99), num_samples=3)
        assert info.value.code.name == "FAILED_PRECONDITION"
        assert f"late upload: round {round_id} no longer accepts uploads" in info.value.details
        assert info.value.attempts == 1  # not retried: it is not transient
    assert clients["dev05"].get_task().action == "done"
    store = coordinator.store()
    status = build_status(store)
    store.close()
    assert [r["uploads"] for r in status["rounds"]] == [7, 7]
    assert all("deadline reached with quorum (7/5 uploads)" in r["reason"] for r in status["rounds"])


def test_round_without_quorum_is_extended_then_failed_and_the_next_round_opens(coordinator_factory) -> None:
    coordinator = coordinator_factory(
        ["a", "b", "c"],
        RoundConfig(min_devices=3, round_timeout_s=0.4, extension_s=0.3, max_extensions=1, rounds=3),
    )
    client = coordinator.client("a")
    client.upload_delta(1, 0, make_delta(1), 4)

    def round_two_open() -> bool:
        task = client.get_task()
        return task.round_id == 2 and task.action == "train"

    coordinator.wait_for(round_two_open, timeout=10)
    store = coordinator.store()
    failed = store.get_round(1)
    events = [event for _, event, _ in store.round_events(1)]
    store.close()
    assert failed.state == "failed" and failed.extensions == 1
    assert failed.reason == "quorum not reached: 1/3 uploads by the deadline after 1 extension(s)"
    assert events == ["opened", "collecting", "extended", "failed"]
    assert coordinator.published_version() == 0  # nothing was published
    # Round 2 starts from the same generalist. Retrying the round-1 upload replays its acknowledgement
    # (idempotency), but nothing new can enter the failed round.
    task = client.get_task()
    assert task.generalist_version == 0 and not task.already_uploaded
    assert client.upload_delta(1, 0, make_delta(1), 4).duplicate
    with pytest.raises(SyncError) as info:
        coordinator.client("b").upload_delta(1, 0, make_delta(2), 4)
    assert info.value.code.name == "FAILED_PRECONDITION" and "it is failed" in info.value.details
