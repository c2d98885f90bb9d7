"""Upload admission: a bounded number of upload streams, the other devices queued first come first served."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from edge_runtime.sync_client import RetryPolicy
from sync_service import encoding
from sync_service.admission import (
    EARLY,
    INITIAL_STREAM_S,
    MAX_RETRY_S,
    MIN_RETRY_S,
    TRUST,
    TRUST_MIN_S,
    UploadSlots,
)
from sync_service.config import RoundConfig, ServerConfig
from sync_service.proto import sync_pb2 as pb
from sync_service.proto import sync_pb2_grpc as pb_grpc

from .sync_helpers import ConnectionCountingRelay, StalledUpload, make_delta, upload_header

#: A well-formed delta: the client checks a payload's header (its tensors' roles) before sending it.
PAYLOAD = encoding.encode(make_delta(0))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------ bookkeeping


def test_slots_are_granted_up_to_capacity_and_queued_devices_learn_their_place() -> None:
    slots = UploadSlots(2, clock=Clock())
    assert slots.acquire("a").granted and slots.acquire("b").granted
    c, d = slots.acquire("c"), slots.acquire("d")
    assert (c.granted, c.position, d.granted, d.position) == (False, 0, False, 1)
    assert c.retry_after_s < d.retry_after_s  # the hints keep the queue's order
    assert slots.enter("a").granted
    slots.leave("a")
    # Nobody is parked: a queued device asleep until its hint has no claim on the freed slot (holding
    # slots for sleepers left most of them idle), so whoever asks first gets it.
    assert slots.acquire("d").granted
    assert not slots.acquire("c").granted
    assert slots.snapshot() == {"capacity": 2, "streaming": 0, "granted": 2, "waiting": 1}


def _park(slots: UploadSlots, device: str, answers: dict) -> threading.Thread:
    """Start `device` asking in a thread and return once it is parked inside acquire."""
    import time

    before = slots.snapshot()["waiting"]
    thread = threading.Thread(target=lambda: answers.update({device: slots.acquire(device)}))
    thread.start()
    deadline = time.monotonic() + 5
    while slots.snapshot()["waiting"] <= before and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    return thread


def test_parked_devices_are_served_in_the_order_they_parked_before_anyone_else() -> None:
    slots = UploadSlots(1, parked=2, park_s=10.0)
    assert slots.enter("a").granted
    answers: dict[str, object] = {}
    first, second = _park(slots, "b", answers), _park(slots, "c", answers)
    assert not slots.enter("pushy").granted  # no slot is free
    slots.leave("a")
    first.join(5)
    assert answers["b"].granted and "c" not in answers
    assert not slots.enter("pushy").granted  # the freed slot went to b; c is owed the next one
    assert slots.enter("b").granted
    slots.leave("b")
    second.join(5)
    assert answers["c"].granted


def test_a_stream_without_a_grant_takes_a_free_slot_no_parked_device_is_owed() -> None:
    slots = UploadSlots(2, clock=Clock())
    assert slots.enter("old-client").granted  # light load: no AcquireUploadSlot needed
    assert slots.acquire("x").granted
    refused = slots.enter("pushy")  # both slots in use
    assert not refused.granted and refused.retry_after_s >= MIN_RETRY_S
    slots.leave("old-client")
    assert slots.enter("pushy").granted


def test_a_granted_slot_expires_if_its_stream_never_opens() -> None:
    clock = Clock()
    slots = UploadSlots(1, grant_ttl_s=10.0, clock=clock)
    assert slots.acquire("a").granted
    assert not slots.acquire("b").granted
    clock.now = 6.0
    again = slots.acquire("a")  # asking again does not extend the grant
    assert again.granted and again.retry_after_s == pytest.approx(4.0)
    clock.now = 10.5  # a never opened its stream
    assert slots.acquire("b").granted
    assert not slots.enter("a").granted  # a lost its slot; it queues again
    assert not slots.acquire("a").granted


def test_a_device_that_stops_asking_loses_its_place() -> None:
    clock = Clock()
    slots = UploadSlots(1, queue_ttl_s=30.0, clock=clock)
    assert slots.acquire("a").granted and slots.enter("a").granted
    assert slots.acquire("gone").position == 0
    assert slots.acquire("b").position == 1
    clock.now = 20.0
    assert slots.acquire("b").position == 1  # b keeps asking
    clock.now = 40.0  # "gone" last asked 40 s ago
    assert slots.acquire("b").position == 0
    slots.leave("a")
    assert slots.acquire("b").granted


def test_the_retry_hint_follows_measured_stream_times_and_stays_bounded() -> None:
    clock = Clock()
    slots = UploadSlots(4, initial_stream_s=1.0, trust=None, clock=clock)
    for device in "abcd":
        assert slots.acquire(device).granted and slots.enter(device).granted
    hints = [slots.acquire(f"w{i}").retry_after_s for i in range(8)]
    assert hints == sorted(hints)
    assert hints[0] == pytest.approx(EARLY * 0.25) and hints[7] == pytest.approx(EARLY * 2.0)
    measured = UploadSlots(4, initial_stream_s=1.0, trust=None, clock=clock)
    for device in "abcd":
        measured.enter(device)
        clock.now += 0.05
    for i in range(30):  # streams turn out to take 0.2 s: slots free up five times faster
        device = "abcd"[i % 4]
        measured.leave(device)
        assert measured.enter(device).granted
        clock.now += 0.05
    assert measured.acquire("w0").retry_after_s == pytest.approx(EARLY * 0.05, rel=0.05)
    assert measured.acquire("w1").retry_after_s == pytest.approx(EARLY * 0.10, rel=0.05)
    many = UploadSlots(1, initial_stream_s=1.0, trust=None, clock=clock)
    many.enter("busy")
    assert max(many.acquire(f"q{i}").retry_after_s for i in range(60)) == MAX_RETRY_S


def test_a_burst_of_devices_is_paced_optimistically_before_any_stream_has_finished() -> None:
    # The hints given to a burst fix the round's pace: a pessimistic guess left slots idle while
    # devices slept (200 devices, 12 slots: 2 streams on average, benchmarks/RESULTS.md).
    clock = Clock()
    slots = UploadSlots(12, clock=clock)
    grants = [slots.acquire(f"d{i}") for i in range(200)]
    assert sum(g.granted for g in grants) == 12
    assert max(g.retry_after_s for g in grants if not g.granted) == pytest.approx(EARLY * 188 * INITIAL_STREAM_S / 12)
    assert INITIAL_STREAM_S <= 0.25


def test_streams_running_longer_than_the_estimate_stretch_the_hints_before_they_finish() -> None:
    clock = Clock()
    slots = UploadSlots(4, initial_stream_s=0.25, clock=clock)
    for device in "abcd":
        slots.enter(device)
    clock.now = 3.0  # a slow link: nothing has finished after 3 s
    assert slots.acquire("w0").retry_after_s == pytest.approx(EARLY * 3.0 / 4)


def test_hints_reach_no_further_ahead_than_the_queue_has_been_watched() -> None:
    # Stream times measured as a burst forms are inflated by the burst itself (every device's TLS
    # handshake); hints extrapolated from them sent a 400-device burst to sleep past its turn and left
    # slots idle (benchmarks/RESULTS.md, session 15). So the horizon grows with the queue's age.
    clock = Clock()
    slots = UploadSlots(4, initial_stream_s=2.0, clock=clock)
    for device in "abcd":
        slots.enter(device)
    first = [slots.acquire(f"w{i}") for i in range(100)]  # the queue forms at t = 0
    assert max(g.retry_after_s for g in first) == pytest.approx(TRUST_MIN_S)
    assert first[0].retry_after_s < TRUST_MIN_S  # near the head, the estimate itself decides
    clock.now = 2.0
    assert slots.acquire("w99").retry_after_s == pytest.approx(TRUST * 2.0)
    clock.now = 10.0
    assert slots.acquire("w99").retry_after_s == MAX_RETRY_S  # watched long enough: the cap is out of the way
    unlimited = UploadSlots(4, initial_stream_s=2.0, trust=None, clock=Clock())
    for device in "abcd":
        unlimited.enter(device)
    assert max(unlimited.acquire(f"w{i}").retry_after_s for i in range(100)) == MAX_RETRY_S


def test_the_horizon_starts_again_when_the_queue_forms_again() -> None:
    clock = Clock()
    slots = UploadSlots(1, clock=clock)
    slots.enter("a")
    assert not slots.acquire("b").granted  # a queue forms at t = 0
    clock.now = 50.0  # "a" took 50 s: the estimate says come back in 30 s (the cap)
    slots.leave("a")
    assert slots.acquire("b").granted and slots.enter("b").granted  # the queue is empty again
    assert slots.acquire("c").retry_after_s == pytest.approx(TRUST_MIN_S)  # a new queue, just formed
    clock.now = 51.0
    assert slots.acquire("c").retry_after_s == pytest.approx(TRUST * 1.0)


def test_one_stalled_stream_does_not_stretch_everyone_s_hints() -> None:
    clock = Clock()
    slots = UploadSlots(4, clock=clock)
    slots.enter("stalled")
    for i in range(40):  # three slots cycle at 0.3 s while one device's stream hangs
        device = f"fast{i % 3}"
        slots.enter(device)
        clock.now += 0.1
        if i >= 2:
            slots.leave(f"fast{(i - 2) % 3}")
    slots.leave("stalled")  # 4 s, far longer than the others
    slots.enter("next")
    slots.enter("after")  # every slot busy again
    assert slots.acquire("w0").retry_after_s == pytest.approx(EARLY * 0.3 / 4, rel=0.05)


def test_the_head_of_the_queue_waits_in_the_server_and_gets_a_freed_slot_at_once() -> None:
    import time

    slots = UploadSlots(1, parked=1, park_s=10.0)
    assert slots.enter("a").granted
    answers: dict[str, object] = {}
    head = threading.Thread(target=lambda: answers.update(b=slots.acquire("b")))
    head.start()
    deadline = time.monotonic() + 5
    while slots.snapshot()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    second = slots.acquire("c")  # one device parks at most: c is told when to come back
    assert not second.granted and second.position == 1 and time.monotonic() - started < 1.0
    freed = time.monotonic()
    slots.leave("a")
    head.join(5)
    assert answers["b"].granted and time.monotonic() - freed < 1.0  # not the 10 s park limit


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        UploadSlots(0)


def test_server_config_slots(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def config(**kwargs: object) -> ServerConfig:
        return ServerConfig(state_dir=tmp_path, insecure=True, listen="127.0.0.1:0", **kwargs)  # type: ignore[arg-type]

    assert config().slots == 12  # max_workers 16 - 4 for the short calls
    assert config(max_workers=2).slots == 1
    assert config(upload_slots=0).slots == 0
    with pytest.raises(ValueError, match="upload_slots"):
        config(upload_slots=-1)
    with pytest.raises(ValueError, match="idle_connection_s"):
        config(idle_connection_s=0)
    assert config().connection_limit == 64 and config(max_workers=40).connection_limit == 144
    assert config(max_connections=0).connection_limit == 0  # no limit
    with pytest.raises(ValueError, match="must exceed the upload slots"):
        config(max_connections=12)
    with pytest.raises(ValueError, match="max_connections"):
        config(max_connections=-1)


# ------------------------------------------------------------------------------------------ on the wire


def test_devices_queue_while_the_slot_is_taken_and_get_it_when_it_frees(coordinator_factory) -> None:
    coordinator = coordinator_factory(
        ["a", "b", "c"], RoundConfig(min_devices=3, round_timeout_s=60, rounds=1), upload_slots=1
    )
    stalled = StalledUpload(coordinator, "a", "slow-a")
    try:
        coordinator.wait_for(lambda: coordinator.server.metrics.registry.get_sample_value(
            "comigs_sync_upload_slots_streaming"
        ) == 1)
        stub = stalled.stub
        md_b = [("authorization", f"Bearer {coordinator.tokens['b']}")]
        answer = stub.AcquireUploadSlot(pb.AcquireUploadSlotRequest(round_id=1), metadata=md_b, timeout=10)
        assert (answer.granted, answer.queue_position, answer.slots) == (False, 0, 1)
        assert answer.retry_after_ms >= 1
        # c skips the queue and opens a stream: refused before any payload is read, and nothing counts.
        header = upload_header(encoding.encode(make_delta(2)), "pushy")
        md_c = [("authorization", f"Bearer {coordinator.tokens['c']}")]
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadDelta(iter([pb.UploadDeltaRequest(header=header)]), metadata=md_c, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "upload slots are taken" in info.value.details() and "AcquireUploadSlot" in info.value.details()
        assert coordinator.store().count_uploads(1) == 0
        # The slot frees when a's upload ends; nobody is long-polling now, so b, asking, gets it.
        stalled.release()
        assert stalled.result and stalled.result[0].round_uploads == 1
        granted = stub.AcquireUploadSlot(pb.AcquireUploadSlotRequest(round_id=1), metadata=md_b, timeout=10)
        assert granted.granted
    finally:
        stalled.close()


def test_clients_wait_their_turn_and_the_round_averages_every_delta(coordinator_factory) -> None:
    devices = ["d0", "d1", "d2", "d3", "d4", "d5"]
    coordinator = coordinator_factory(
        devices, RoundConfig(min_devices=len(devices), round_timeout_s=60, rounds=1), upload_slots=2
    )
    deltas = {name: make_delta(i) for i, name in enumerate(devices)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(devices))

    def upload(name: str) -> None:
        client = coordinator.client(name, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05))
        try:
            barrier.wait()
            client.upload_delta(1, 0, deltas[name], 10 + devices.index(name))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=upload, args=(name,)) for name in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    coordinator.wait_for(lambda: coordinator.published_version() == 1)
    weights = {name: 10 + devices.index(name) for name in devices}
    total = sum(weights.values())
    published = coordinator.client("d0").download_generalist(1).tensors
    for name, previous in coordinator.generalist.items():
        mean = sum(np.float64(weights[d]) * deltas[d][name].astype(np.float64) for d in devices) / total
        np.testing.assert_array_equal(published[name], previous + mean.astype(np.float32), err_msg=name)
    rejects = coordinator.server.metrics.registry.get_sample_value(
        "comigs_sync_rejects_total", {"code": "RESOURCE_EXHAUSTED", "reason": "no_upload_slot"}
    )
    assert not rejects  # queued clients never had a stream refused


def test_admission_off_grants_at_once(coordinator_factory) -> None:
    coordinator = coordinator_factory(
        ["a", "b"], RoundConfig(min_devices=2, round_timeout_s=60, rounds=1), upload_slots=0
    )
    stalled = StalledUpload(coordinator, "a", "slow-a")
    try:
        assert coordinator.client("b").upload_delta(1, 0, make_delta(1), 1).round_uploads == 1
    finally:
        stalled.close()


class _OlderCoordinator:
    """A real gRPC server speaking an older (or stricter) SyncService: only what the test defines."""

    def __init__(self, acquire=None, get_task=None) -> None:  # type: ignore[no-untyped-def]
        from concurrent import futures

        self.calls = {"AcquireUploadSlot": 0, "UploadDelta": 0}
        calls = self.calls

        class Servicer(pb_grpc.SyncServiceServicer):
            def UploadDelta(self, request_iterator, context):  # noqa: N802 - gRPC method name
                calls["UploadDelta"] += 1
                received = sum(len(m.chunk.data) for m in request_iterator)
                return pb.UploadDeltaResponse(round_id=1, upload_id="u", accepted_bytes=received)

            def GetTask(self, request, context):  # noqa: N802 - gRPC method name
                return get_task(request) if get_task is not None else pb.GetTaskResponse(action=pb.ACTION_TRAIN)

        if acquire is not None:

            def acquire_slot(self, request, context):  # type: ignore[no-untyped-def]
                calls["AcquireUploadSlot"] += 1
                return acquire(request)

            Servicer.AcquireUploadSlot = acquire_slot  # type: ignore[method-assign]
        else:
            original = Servicer.AcquireUploadSlot

            def counted(self, request, context):  # type: ignore[no-untyped-def]
                calls["AcquireUploadSlot"] += 1
                return original(self, request, context)  # the generated default: UNIMPLEMENTED

            Servicer.AcquireUploadSlot = counted  # type: ignore[method-assign]
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_SyncServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.relay = ConnectionCountingRelay(self.port)

    def client(self, **kwargs):  # type: ignore[no-untyped-def]
        from edge_runtime.sync_client import SyncClient

        return SyncClient(f"127.0.0.1:{self.relay.port}", "cmgs1.token", insecure=True, **kwargs)

    def stop(self) -> None:
        self.server.stop(0)
        self.relay.close()


def test_a_coordinator_without_admission_is_asked_once_then_never_again() -> None:
    older = _OlderCoordinator()
    try:
        client = older.client()
        for key in ("k1", "k2"):
            assert client.upload_encoded(1, 0, PAYLOAD, 1, encoding="fp32", idempotency_key=key).upload_id
        client.close()
    finally:
        older.stop()
    assert older.calls == {"AcquireUploadSlot": 1, "UploadDelta": 2}


def test_a_device_gives_up_waiting_for_a_slot_at_its_transfer_timeout() -> None:
    from edge_runtime.sync_client import SyncError

    older = _OlderCoordinator(lambda request: pb.AcquireUploadSlotResponse(
        granted=False, retry_after_ms=100, queue_position=7, slots=2
    ))
    try:
        client = older.client(transfer_timeout_s=0.5, retry=RetryPolicy(max_attempts=1))
        with pytest.raises(SyncError) as info:
            client.upload_encoded(1, 0, PAYLOAD, 1, encoding="fp32", idempotency_key="k")
        client.close()
    finally:
        older.stop()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "7 devices ahead, 2 slots" in str(info.value)
    assert 3 <= older.calls["AcquireUploadSlot"] <= 6 and older.calls["UploadDelta"] == 0


def test_a_closed_client_never_reuses_its_old_connection() -> None:
    """After every acknowledged upload the client closes its connection; the next upload must open a
    new one. gRPC's global subchannel pool would hand a new channel the closing one's live connection
    (~13 % of quick close/reopen cycles here), keeping its TLS state on the coordinator."""
    older = _OlderCoordinator()
    try:
        client = older.client()
        for i in range(20):
            assert client.upload_encoded(1, 0, PAYLOAD, 1, encoding="fp32", idempotency_key=f"k{i}").upload_id
        client.close()
    finally:
        older.stop()
    assert older.calls["UploadDelta"] == 20
    assert older.relay.accepted == 20


@pytest.mark.parametrize("retry_after_ms, hangs_up", [(100, False), (300, True)])
def test_a_device_queued_for_a_quarter_second_or_more_hangs_up_until_it_asks_again(retry_after_ms, hangs_up) -> None:
    answers = iter([pb.AcquireUploadSlotResponse(granted=False, retry_after_ms=retry_after_ms, queue_position=30,
                                                 slots=2),
                    pb.AcquireUploadSlotResponse(granted=True, retry_after_ms=10_000)])
    older = _OlderCoordinator(lambda request: next(answers))
    slept: list[float] = []
    try:
        client = older.client(sleep=slept.append)
        assert client.upload_encoded(1, 0, PAYLOAD, 1, encoding="fp32", idempotency_key="k").upload_id
        client.close()
    finally:
        older.stop()
    assert older.calls == {"AcquireUploadSlot": 2, "UploadDelta": 1}
    assert slept and slept[0] >= retry_after_ms / 1000
    assert older.relay.accepted == (2 if hangs_up else 1)


def test_an_idle_connection_is_closed_and_the_device_reconnects_on_its_next_call(coordinator_factory) -> None:
    import time

    coordinator = coordinator_factory(
        ["a"], RoundConfig(min_devices=1, round_timeout_s=60, rounds=1), idle_connection_s=0.5
    )
    states: list[grpc.ChannelConnectivity] = []
    channel = grpc.secure_channel(coordinator.target, grpc.ssl_channel_credentials(coordinator.tls.cert_pem))
    channel.subscribe(states.append)
    stub = pb_grpc.SyncServiceStub(channel)
    metadata = [("authorization", f"Bearer {coordinator.tokens['a']}")]
    assert stub.GetTask(pb.GetTaskRequest(), metadata=metadata, timeout=10).action == pb.ACTION_TRAIN
    ready, idle = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE

    def closed_after_ready() -> bool:  # state callbacks arrive asynchronously, READY possibly after GetTask
        return ready in states and idle in states[states.index(ready):]

    deadline = time.monotonic() + 10
    while not closed_after_ready():
        assert time.monotonic() < deadline, f"the coordinator never closed the idle connection: {states}"
        time.sleep(0.05)
    assert stub.GetTask(pb.GetTaskRequest(), metadata=metadata, timeout=10).action == pb.ACTION_TRAIN
    channel.close()


@pytest.mark.parametrize("retry_after_ms, hangs_up", [(100, False), (300, True)])
def test_a_device_told_to_wait_a_quarter_second_or_more_for_its_task_hangs_up(retry_after_ms, hangs_up) -> None:
    answers = iter([pb.GetTaskResponse(action=pb.ACTION_WAIT, retry_after_ms=retry_after_ms),
                    pb.GetTaskResponse(action=pb.ACTION_TRAIN, round_id=3)])
    older = _OlderCoordinator(get_task=lambda request: next(answers))
    slept: list[float] = []
    try:
        client = older.client(sleep=slept.append)
        assert client.wait_for_task().round_id == 3
        client.close()
    finally:
        older.stop()
    assert slept == [retry_after_ms / 1000]
    assert older.relay.accepted == (2 if hangs_up else 1)


def test_connections_beyond_the_limit_are_refused_and_a_device_gets_in_once_one_frees(coordinator_factory) -> None:
    """gRPC closes connections beyond --max-connections as they arrive; SyncClient then drops its
    channel, so its retry connects afresh after its own short backoff (gRPC's channel would wait out
    its 1 s reconnect backoff first, longer than this client's whole retry budget)."""
    import time

    from edge_runtime.sync_client import SyncClient, SyncError

    coordinator = coordinator_factory(
        ["a", "b", "c"], RoundConfig(min_devices=3, round_timeout_s=60, rounds=1), upload_slots=1,
        max_connections=2,
    )
    held = [coordinator.client(name) for name in ("a", "b")]
    for client in held:
        assert client.get_task().action == "train"  # two connections, held open
    late = SyncClient(coordinator.target, coordinator.tokens["c"], root_certificates=coordinator.tls.cert_pem,
                      retry=RetryPolicy(max_attempts=1))
    with pytest.raises(SyncError) as info:
        late.get_task()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    patient = SyncClient(coordinator.target, coordinator.tokens["c"], root_certificates=coordinator.tls.cert_pem,
                         retry=RetryPolicy(max_attempts=8, initial_backoff_s=0.1, multiplier=1.0))
    freed = threading.Timer(0.2, held[0].close)
    freed.start()
    started = time.monotonic()
    try:
        assert patient.get_task().action == "train"
    finally:
        freed.join()
        for client in (held[1], late, patient):
            client.close()
    assert time.monotonic() - started < 0.9  # before gRPC's own reconnect backoff could have let it in
