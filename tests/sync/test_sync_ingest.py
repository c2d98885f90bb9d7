"""Ingest internals that the benchmark tuning touched: vectorised validation runs and group commit.

* The header is checked as the stream arrives, the values once it is complete, read back in blocks whose
  whole tensors go to numpy at once; the norm (and so the clipping factor) must depend neither on how the
  client chunked the stream nor on the block size, and errors must still name the first offending tensor.
* Uploads that finish together are committed in one SQLite transaction; every caller must still get its
  own acknowledgement only after its row is durable, and the one-upload-per-device rules must hold.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from sync_service import encoding as enc
from sync_service import ingest
from sync_service.auth import add_device
from sync_service.config import RoundConfig
from sync_service.errors import SyncError
from sync_service.ingest import UploadReceiver
from sync_service.rounds import RoundManager
from sync_service.store import Store
from sync_service.validation import UploadRequest

from .sync_helpers import generalist_shapes, make_delta, make_generalist


def _request(device: str, payload: bytes, encoding: str = "fp32", key: str | None = None) -> UploadRequest:
    return UploadRequest(
        device_id=device,
        round_id=1,
        base_version=0,
        num_samples=8,
        encoding=encoding,
        idempotency_key=key or f"{device}-key",
        total_bytes=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store.initialise(tmp_path / "state", make_generalist())
    yield store
    store.close()


def _receive(store: Store, payload: bytes, chunk: int, encoding: str = "fp32", block: int | None = None) -> float:
    """Stream `payload` in `chunk`-byte pieces into a receiver that verifies it in `block`-byte reads."""
    receiver = UploadReceiver(store.tmp_dir, _request("dev", payload, encoding), store.manifest, 1 << 20)
    try:
        with pytest.MonkeyPatch.context() as patch:
            if block is not None:
                patch.setattr(ingest, "VERIFY_BLOCK_BYTES", block)
            for offset in range(0, len(payload), chunk):
                receiver.feed(payload[offset : offset + chunk])
            return receiver.finish().update_norm
    finally:
        receiver.discard()


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_norm_is_bit_identical_whatever_the_chunking(store: Store, encoding: str) -> None:
    delta = make_delta(3, dyadic=False)
    payload = enc.encode(delta, encoding)
    norms = {_receive(store, payload, chunk, encoding) for chunk in (7, 1000, 4096, 65536, len(payload))}
    norms |= {_receive(store, payload, 4096, encoding, block) for block in (1, 7, 1000, 4096, 65536)}
    assert len(norms) == 1
    decoded = enc.decode(payload)
    expected = np.sqrt(sum(float(np.sum(decoded[n].astype(np.float64) ** 2)) for n in decoded))
    assert norms.pop() == pytest.approx(expected, rel=1e-6)


def test_norm_survives_a_float32_sum_of_squares_that_overflows(store: Store) -> None:
    """Squares of 1e19 are finite in float32 but four of them sum past its maximum (3.4e38)."""
    delta = make_delta(3, dyadic=False)
    target = sorted(generalist_shapes())[0]
    delta[target].flat[:4] = 1e19
    payload = enc.encode(delta, "fp32")
    norms = {_receive(store, payload, chunk) for chunk in (4096, len(payload))}
    assert len(norms) == 1
    expected = np.sqrt(sum(float(np.sum(delta[n].astype(np.float64) ** 2)) for n in delta))
    assert norms.pop() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("block", [64, 4096, 1 << 20])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
def test_non_finite_value_names_its_tensor_in_runs_and_split_tensors(store: Store, block: int, bad: float) -> None:
    delta = make_delta(4)
    names = sorted(generalist_shapes())
    target = names[len(names) // 2]
    delta[target].flat[5] = bad
    payload = enc.encode(delta, "fp32")
    with pytest.raises(SyncError) as info:
        _receive(store, payload, 4096, block=block)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(target) in info.value.message


def test_a_bad_header_is_refused_as_it_arrives_before_the_data(store: Store) -> None:
    delta = make_delta(4)
    delta["model.layers.0.mlp.router.weight"] = np.zeros((2, 4), np.float32)  # never exchanged
    payload = enc.encode(delta, "fp32")
    header_end = 8 + int.from_bytes(payload[:8], "little")
    receiver = UploadReceiver(store.tmp_dir, _request("dev", payload), store.manifest, 1 << 20)
    try:
        receiver.feed(payload[:5])  # not even the length yet
        with pytest.raises(SyncError) as info:
            receiver.feed(payload[5:header_end])
    finally:
        receiver.discard()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "router.weight" in info.value.message and "unknown tensor" in info.value.message


def test_decoder_runs_cover_every_tensor_once_in_data_order() -> None:
    payload = enc.encode(make_delta(5), "fp32")
    seen: list[str] = []

    def one(entry: enc.TensorEntry, raw: memoryview) -> None:
        assert len(raw) == entry.nbytes
        seen.append(entry.name)

    def run(entries, raw: memoryview) -> None:
        assert len(raw) == sum(e.nbytes for e in entries)
        seen.extend(e.name for e in entries)

    for chunk in (13, 3000, 1 << 20):
        seen.clear()
        decoder = enc.PayloadDecoder(on_tensor=one, on_tensors=run)
        for offset in range(0, len(payload), chunk):
            decoder.feed(payload[offset : offset + chunk])
        header = decoder.close()
        assert seen == [entry.name for entry in header.entries]


def test_group_commit_acknowledges_every_concurrent_upload_once(store: Store) -> None:
    devices = [f"dev-{i:02d}" for i in range(24)]
    for device in devices:
        add_device(store, device)
    rounds = RoundManager(store, RoundConfig(min_devices=len(devices) + 1, round_timeout_s=600, rounds=1))
    rounds.tick()  # opens round 1
    received = {}
    for i, device in enumerate(devices):
        payload = enc.encode(make_delta(i), "fp32")
        request = _request(device, payload)
        receiver = UploadReceiver(store.tmp_dir, request, store.manifest, 1 << 20)
        receiver.feed(payload)
        received[device] = (request, receiver.finish())
    # One device retries with the same key while its first upload is being committed, and one sends a
    # second upload under a new key: exactly one row per device, the retry is a duplicate, the other refused.
    retry_payload = enc.encode(make_delta(0), "fp32")
    retry = _request(devices[0], retry_payload)
    receiver = UploadReceiver(store.tmp_dir, retry, store.manifest, 1 << 20)
    receiver.feed(retry_payload)
    retry_received = receiver.finish()
    second_payload = enc.encode(make_delta(99), "fp32")
    second = _request(devices[1], second_payload, key="another-key")
    receiver = UploadReceiver(store.tmp_dir, second, store.manifest, 1 << 20)
    receiver.feed(second_payload)
    second_received = receiver.finish()

    results: dict[str, object] = {}
    start = threading.Barrier(len(devices) + 2)

    def commit(name: str, request: UploadRequest, upload) -> None:
        start.wait()
        try:
            results[name] = rounds.commit_upload(request, upload)
        except SyncError as exc:
            results[name] = exc

    threads = [threading.Thread(target=commit, args=(d, *received[d])) for d in devices]
    threads.append(threading.Thread(target=commit, args=("retry", retry, retry_received)))
    threads.append(threading.Thread(target=commit, args=("second", second, second_received)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    acks = {d: results[d] for d in devices}
    second_result = results["second"]
    if isinstance(second_result, SyncError):
        assert second_result.code == grpc.StatusCode.ALREADY_EXISTS
    else:  # the second upload of devices[1] won the race: then its first one was refused
        assert isinstance(acks[devices[1]], SyncError)
        assert acks[devices[1]].code == grpc.StatusCode.ALREADY_EXISTS
        acks[devices[1]] = second_result
    assert all(not isinstance(a, SyncError) for a in acks.values()), acks
    assert len({a.upload_id for a in acks.values()}) == len(devices)
    assert store.count_uploads(1) == len(devices)
    assert max(a.round_uploads for a in acks.values()) == len(devices)
    # The retry lands either before or after the first upload's commit: duplicate ack or, if it won the
    # race, the first upload is the duplicate. Either way one row, same upload id.
    first, again = acks[devices[0]], results["retry"]
    assert not isinstance(again, SyncError)
    assert {first.duplicate, again.duplicate} == {False, True}
    assert first.upload_id == again.upload_id
    for row in store.uploads_for_round(1):
        assert (store.root / row.path).exists()
    files = sorted(p.name for p in store.round_upload_dir(1).iterdir())
    assert len(files) == len(devices)  # refused and duplicate files were removed
