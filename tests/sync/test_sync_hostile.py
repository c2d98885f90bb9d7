"""Hostile input: every bad request gets the right status and a useful message, and changes nothing.

One coordinator (real TLS, real SQLite) serves the whole module. Its state is set up once: round 1
published (devices a and b), round 2 collecting with one upload from a. Each case sends one bad request
through a raw gRPC stub (no client-library guard rails) and then checks that the database rows, the
tensor files and the temp directory are exactly as before, and that the server still answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sync_service import encoding
from sync_service.auth import add_device
from sync_service.config import RoundConfig
from sync_service.proto import sync_pb2 as pb
from sync_service.proto import sync_pb2_grpc as pb_grpc
from sync_service.store import Store

from .sync_helpers import Coordinator, make_delta, start_coordinator

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
EXISTS = grpc.StatusCode.ALREADY_EXISTS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class World:
    coordinator: Coordinator
    channel: grpc.Channel
    stub: pb_grpc.SyncServiceStub
    tokens: dict[str, str]
    round_id: int
    base_version: int
    a_key: str
    a_payload_sha: bytes
    b_round1_key: str

    def md(self, device: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.tokens[device]}")]

    def upload(
        self, messages: Iterable[pb.UploadDeltaRequest], metadata: list[tuple[str, str]] | None
    ) -> None:
        self.stub.UploadDelta(iter(list(messages)), metadata=metadata, timeout=20)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tls) -> World:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("hostile")
    coordinator = start_coordinator(
        tmp, tls, ["a", "b"], RoundConfig(min_devices=2, round_timeout_s=600, rounds=5)
    )
    ca, cb = (
        coordinator.client("a", state_path=tmp / "a.json"),
        coordinator.client("b", state_path=tmp / "b.json"),
    )
    ca.upload_delta(1, 0, make_delta(0), 10)
    cb.upload_delta(1, 0, make_delta(1), 10)
    coordinator.wait_for(lambda: coordinator.published_version() == 1)
    store = Store(coordinator.state_dir)
    tokens = dict(coordinator.tokens)
    for name in ("c", "revoked"):
        tokens[name] = add_device(store, name)
    store.revoke_device("revoked")
    b_round1_key = store.upload_for(1, "b").idempotency_key
    store.close()
    coordinator.wait_for(lambda: ca.get_task().round_id == 2)
    delta = make_delta(2)
    ca.upload_delta(2, 1, delta, 10)
    store = Store(coordinator.state_dir)
    a_upload = store.upload_for(2, "a")
    store.close()
    channel = grpc.secure_channel(coordinator.target, grpc.ssl_channel_credentials(tls.cert_pem))
    w = World(
        coordinator,
        channel,
        pb_grpc.SyncServiceStub(channel),
        tokens,
        2,
        1,
        a_upload.idempotency_key,
        bytes.fromhex(a_upload.payload_sha256),
        b_round1_key,
    )
    yield w
    channel.close()
    coordinator.close()


def snapshot(state_dir: Path) -> dict[str, object]:
    db = sqlite3.connect(f"file:{state_dir / 'sync.db'}?mode=ro", uri=True)
    try:
        tables = {}
        for table, order in (
            ("rounds", "round_id"),
            ("uploads", "upload_id"),
            ("generalists", "version"),
            ("round_events", "id"),
            ("reports", "id"),
        ):
            tables[table] = db.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
        tables["devices"] = db.execute(
            "SELECT device_id, token_id, token_hash, revoked_at, capabilities FROM devices ORDER BY device_id"
        ).fetchall()
    finally:
        db.close()
    files = sorted(
        str(path.relative_to(state_dir))
        for sub in ("tmp", "uploads", "generalists")
        for path in (state_dir / sub).rglob("*")
        if path.is_file()
    )
    return {"tables": tables, "files": files}


# ------------------------------------------------------------------------------------------ builders


def header_msg(w: World, payload: bytes, device: str = "b", **overrides: object) -> pb.UploadDeltaRequest:
    fields: dict[str, object] = dict(
        device_id=device,
        round_id=w.round_id,
        base_version=w.base_version,
        num_samples=10,
        encoding=pb.ENCODING_FP32,
        idempotency_key=f"key-{os.urandom(6).hex()}",
        total_bytes=len(payload),
        payload_sha256=hashlib.sha256(payload).digest(),
    )
    fields.update(overrides)
    return pb.UploadDeltaRequest(header=pb.UploadHeader(**fields))  # type: ignore[arg-type]


def chunk_msgs(payload: bytes, size: int = 4096, start_seq: int = 0) -> list[pb.UploadDeltaRequest]:
    return [
        pb.UploadDeltaRequest(chunk=pb.Chunk(seq=start_seq + i, offset=off, data=payload[off : off + size]))
        for i, off in enumerate(range(0, len(payload), size))
    ]


def good_payload(enc: str = "fp32") -> bytes:
    return encoding.encode(make_delta(7), enc)


def send(w: World, payload: bytes, device: str = "b", **header: object) -> None:
    w.upload([header_msg(w, payload, device, **header), *chunk_msgs(payload)], w.md(device))


def raw_payload(header: dict[str, object], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def manifest_entries(dtype: str = "F32", itemsize: int = 4) -> tuple[dict[str, object], int]:
    header: dict[str, object] = {}
    offset = 0
    for name, value in sorted(make_delta(0).items()):
        size = value.size * itemsize
        header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


def tamper(mutate: Callable[[dict[str, dict[str, object]]], None], dtype: str = "F32") -> bytes:
    header, size = manifest_entries(dtype, 4 if dtype == "F32" else 2)
    mutate(header)  # type: ignore[arg-type]
    end = max(int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__")  # type: ignore[index]
    return raw_payload(header, b"\0" * max(end, 0))


def with_value(enc: str, name_index: int, index: tuple[int, ...], value: float) -> bytes:
    delta = make_delta(3)
    name = sorted(delta)[name_index]
    delta[name][index] = value
    specs = [(n, encoding.ENCODING_DTYPE[enc], delta[n].shape) for n in sorted(delta)]
    dtype = "<f4" if enc == "fp32" else "<f2"
    body = b"".join(delta[n].astype(dtype).tobytes() for n in sorted(delta))
    return encoding.build_header(specs, {"encoding": enc}) + body


def int8_payload(mutate_scale: Callable[[str, np.ndarray], np.ndarray | None]) -> bytes:
    """An int8 payload whose scales pass through `mutate_scale(name, scale)` (None drops the tensor)."""
    delta = make_delta(4)
    tensors: dict[str, np.ndarray] = {}
    for name in sorted(delta):
        q, scale = encoding.quantize_int8(delta[name], "tensor")
        tensors[name] = q
        new = mutate_scale(name, scale)
        if new is not None:
            tensors[encoding.scale_name(name)] = new
    specs = [(n, "I8" if v.dtype == np.int8 else "F32", v.shape) for n, v in sorted(tensors.items())]
    return encoding.build_header(specs, {"encoding": "int8"}) + b"".join(
        tensors[n].astype("<f4" if tensors[n].dtype != np.int8 else "i1").tobytes() for n in sorted(tensors)
    )


FIRST = sorted(make_delta(0))[0]
THIRD = sorted(make_delta(0))[2]


def _shift(entry: dict[str, object], by: int) -> None:
    begin, end = entry["data_offsets"]  # type: ignore[misc]
    entry["data_offsets"] = [begin + by, end + by]


def _overlap(header: dict[str, dict[str, object]]) -> None:
    _shift(header[THIRD], -4)


def _gap(header: dict[str, dict[str, object]]) -> None:
    for name in header:
        if name >= THIRD:
            _shift(header[name], 4)


def _as_f64(header: dict[str, dict[str, object]]) -> None:
    for entry in header.values():
        begin, end = entry["data_offsets"]  # type: ignore[misc]
        entry.update(dtype="F64", data_offsets=[begin * 2, end * 2])


def _add_scale(header: dict[str, dict[str, object]]) -> None:
    end = max(entry["data_offsets"][1] for entry in header.values())  # type: ignore[index]
    header[FIRST + ":scale"] = {"dtype": "F32", "shape": [], "data_offsets": [end, end + 4]}


# ------------------------------------------------------------------------------------------ the cases


def _get_task(md: list[tuple[str, str]] | None, device_id: str = "") -> Callable[[World], None]:
    return lambda w: w.stub.GetTask(pb.GetTaskRequest(device_id=device_id), metadata=md, timeout=10)


def _acquire_slot(
    md: list[tuple[str, str]] | None, device_id: str = "", round_id: int = 1
) -> Callable[[World], None]:
    request = pb.AcquireUploadSlotRequest(device_id=device_id, round_id=round_id)
    return lambda w: w.stub.AcquireUploadSlot(request, metadata=md, timeout=10)


CASES: list[tuple[str, Callable[[World], None], grpc.StatusCode, str]] = [
    # --- authentication and identity
    ("no_token", lambda w: _get_task(None)(w), UNAUTH, "missing credentials"),
    ("basic_scheme", lambda w: _get_task([("authorization", "Basic YTpi")])(w), UNAUTH, "Bearer <token>"),
    ("empty_bearer", lambda w: _get_task([("authorization", "Bearer ")])(w), UNAUTH, "Bearer <token>"),
    (
        "malformed_token",
        lambda w: _get_task([("authorization", "Bearer hunter2")])(w),
        UNAUTH,
        "malformed token",
    ),
    (
        "wrong_secret",
        lambda w: _get_task([("authorization", "Bearer " + w.tokens["a"][:-4] + "AAAA")])(w),
        UNAUTH,
        "invalid token",
    ),
    (
        "unknown_token_id",
        lambda w: _get_task(
            [("authorization", "Bearer cmgs1.0123456789abcdef." + w.tokens["a"].split(".")[2])]
        )(w),
        UNAUTH,
        "invalid token",
    ),
    ("two_authorization_entries", lambda w: _get_task(w.md("a") + w.md("b"))(w), UNAUTH, "more than one"),
    ("revoked_device", lambda w: _get_task(w.md("revoked"))(w), DENIED, "revoked"),
    ("revoked_device_upload", lambda w: send(w, good_payload(), device="revoked"), DENIED, "revoked"),
    (
        "impersonation_metadata",
        lambda w: _get_task(w.md("b") + [("x-comigs-device-id", "a")])(w),
        DENIED,
        "cannot act as 'a'",
    ),
    ("impersonation_get_task", lambda w: _get_task(w.md("b"), device_id="a")(w), DENIED, "cannot act as 'a'"),
    ("slot_without_token", lambda w: _acquire_slot(None)(w), UNAUTH, "missing credentials"),
    ("slot_impersonation", lambda w: _acquire_slot(w.md("b"), device_id="a")(w), DENIED, "cannot act as 'a'"),
    ("slot_unknown_round", lambda w: _acquire_slot(w.md("a"), round_id=7)(w), PRECONDITION, "round 7 does not"),
    (
        "impersonation_upload_header",
        lambda w: w.upload(
            [header_msg(w, good_payload(), device="a"), *chunk_msgs(good_payload())], w.md("b")
        ),
        DENIED,
        "cannot act as 'a'",
    ),
    (
        "impersonation_register",
        lambda w: w.stub.RegisterDevice(
            pb.RegisterDeviceRequest(
                device_id="a",
                capabilities=pb.DeviceCapabilities(num_experts=2, num_generalists=1, lora_rank=4),
            ),
            metadata=w.md("c"),
            timeout=10,
        ),
        DENIED,
        "cannot act as 'a'",
    ),
    (
        "impersonation_report",
        lambda w: w.stub.ReportMetrics(
            pb.ReportMetricsRequest(device_id="a", round_id=2), metadata=w.md("c"), timeout=10
        ),
        DENIED,
        "cannot act as",
    ),
    (
        "no_token_upload",
        lambda w: w.upload([header_msg(w, good_payload()), *chunk_msgs(good_payload())], None),
        UNAUTH,
        "missing credentials",
    ),
    (
        "no_token_download",
        lambda w: list(w.stub.DownloadGeneralist(pb.DownloadGeneralistRequest(), timeout=10)),
        UNAUTH,
        "missing credentials",
    ),
    # --- round state
    ("future_round", lambda w: send(w, good_payload(), round_id=3), PRECONDITION, "round 3 does not exist"),
    (
        "published_round_late",
        lambda w: send(w, good_payload(), round_id=1, base_version=0),
        PRECONDITION,
        "late upload: round 1",
    ),
    (
        "stale_base_version",
        lambda w: send(w, good_payload(), base_version=0),
        PRECONDITION,
        "stale base version",
    ),
    ("round_zero", lambda w: send(w, good_payload(), round_id=0), INVALID, "round_id must be >= 1"),
    (
        "second_upload_same_round",
        lambda w: send(w, good_payload(), device="a"),
        EXISTS,
        "counts once per round",
    ),
    (
        "idempotency_key_other_payload",
        lambda w: send(w, good_payload(), device="a", idempotency_key=w.a_key),
        EXISTS,
        "different payload",
    ),
    (
        "idempotency_key_other_round",
        lambda w: send(w, good_payload(), idempotency_key=w.b_round1_key),
        EXISTS,
        "already used for round 1",
    ),
    # --- upload header
    ("header_missing", lambda w: w.upload(chunk_msgs(good_payload()), w.md("b")), INVALID, "header missing"),
    ("empty_stream", lambda w: w.upload([], w.md("b")), INVALID, "empty upload stream"),
    (
        "header_twice",
        lambda w: w.upload(
            [header_msg(w, good_payload()), header_msg(w, good_payload()), *chunk_msgs(good_payload())],
            w.md("b"),
        ),
        INVALID,
        "sent twice",
    ),
    ("zero_samples", lambda w: send(w, good_payload(), num_samples=0), INVALID, "num_samples"),
    (
        "unspecified_encoding",
        lambda w: send(w, good_payload(), encoding=pb.ENCODING_UNSPECIFIED),
        INVALID,
        "encoding 0",
    ),
    ("unknown_encoding_number", lambda w: send(w, good_payload(), encoding=99), INVALID, "encoding 99"),
    (
        "empty_idempotency_key",
        lambda w: send(w, good_payload(), idempotency_key=""),
        INVALID,
        "idempotency_key",
    ),
    (
        "idempotency_key_with_space",
        lambda w: send(w, good_payload(), idempotency_key="a b"),
        INVALID,
        "idempotency_key",
    ),
    (
        "idempotency_key_too_long",
        lambda w: send(w, good_payload(), idempotency_key="k" * 129),
        INVALID,
        "idempotency_key",
    ),
    (
        "bad_checksum_length",
        lambda w: send(w, good_payload(), payload_sha256=b"\1" * 16),
        INVALID,
        "payload_sha256",
    ),
    (
        "declared_size_over_limit",
        lambda w: send(w, good_payload(), total_bytes=1 << 40),
        INVALID,
        "exceeds the limit",
    ),
    (
        "declared_size_mismatch",
        lambda w: send(w, good_payload(), total_bytes=len(good_payload()) + 8),
        INVALID,
        "payload header describes",
    ),
    # --- stream framing
    (
        "duplicate_chunk",
        lambda w: w.upload(
            [header_msg(w, good_payload()), chunk_msgs(good_payload())[0], chunk_msgs(good_payload())[0]],
            w.md("b"),
        ),
        INVALID,
        "duplicate chunk",
    ),
    (
        "out_of_order_chunk",
        lambda w: w.upload([header_msg(w, good_payload()), *chunk_msgs(good_payload())[1:2]], w.md("b")),
        INVALID,
        "out-of-order chunk: expected seq 0, got 1",
    ),
    (
        "wrong_chunk_offset",
        lambda w: w.upload(
            [
                header_msg(w, good_payload()),
                pb.UploadDeltaRequest(chunk=pb.Chunk(seq=0, offset=100, data=good_payload()[:10])),
            ],
            w.md("b"),
        ),
        INVALID,
        "offset 100",
    ),
    (
        "empty_chunk",
        lambda w: w.upload(
            [header_msg(w, good_payload()), pb.UploadDeltaRequest(chunk=pb.Chunk(seq=0, offset=0, data=b""))],
            w.md("b"),
        ),
        INVALID,
        "chunk 0 is empty",
    ),
    (
        "empty_message",
        lambda w: w.upload([header_msg(w, good_payload()), pb.UploadDeltaRequest()], w.md("b")),
        INVALID,
        "empty message",
    ),
    (
        "truncated_stream",
        lambda w: w.upload([header_msg(w, good_payload()), *chunk_msgs(good_payload(), 1024)[:2]], w.md("b")),
        INVALID,
        "truncated upload",
    ),
    (
        "oversize_stream",
        lambda w: w.upload(
            [header_msg(w, good_payload()), *chunk_msgs(good_payload() + b"x" * 9)], w.md("b")
        ),
        INVALID,
        "more than the",
    ),
    (
        "checksum_mismatch",
        lambda w: send(w, good_payload(), payload_sha256=b"\0" * 32),
        INVALID,
        "checksum mismatch",
    ),
    (
        "message_over_grpc_limit",
        lambda w: w.upload(
            [
                header_msg(w, good_payload()),
                pb.UploadDeltaRequest(chunk=pb.Chunk(seq=0, offset=0, data=b"\0" * (5 << 20))),
            ],
            w.md("b"),
        ),
        EXHAUSTED,
        "larger than max",
    ),
    (
        "huge_metadata",
        lambda w: _get_task(w.md("a") + [("x-padding", "p" * 20000)])(w),
        EXHAUSTED,
        "metadata",
    ),
    # --- payload structure
    ("garbage_bytes", lambda w: send(w, os.urandom(4096)), INVALID, "malformed payload"),
    (
        "header_length_huge",
        lambda w: send(w, (1 << 40).to_bytes(8, "little") + b"{}" * 100),
        INVALID,
        "header is 1099511627776 bytes",
    ),
    (
        "header_not_json",
        lambda w: send(w, raw_payload({}, b"")[:8] + b"{nope" + b" " * 100),
        INVALID,
        "malformed payload",
    ),
    (
        "header_not_object",
        lambda w: send(w, (2).to_bytes(8, "little") + b"[]" + b"\0" * 64),
        INVALID,
        "must be a JSON object",
    ),
    (
        "duplicate_tensor_in_header",
        lambda w: send(
            w,
            (lambda t: len(t).to_bytes(8, "little") + t + b"\0" * 64)(
                b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
            ),
        ),
        INVALID,
        "names tensor 'x' twice",
    ),
    ("overlapping_offsets", lambda w: send(w, tamper(_overlap)), INVALID, "overlaps the previous tensor"),
    ("gap_in_offsets", lambda w: send(w, tamper(_gap)), INVALID, "leaves a gap"),
    (
        "offsets_do_not_match_shape",
        lambda w: send(w, tamper(lambda h: h[FIRST].update(shape=[1, 2, 3]))),
        INVALID,
        "data_offsets span",
    ),
    (
        "unknown_dtype",
        lambda w: send(w, tamper(lambda h: h[FIRST].update(dtype="F8"))),
        INVALID,
        "unknown dtype 'F8'",
    ),
    (
        "extra_header_field",
        lambda w: send(w, tamper(lambda h: h[FIRST].update(extra=1))),
        INVALID,
        "exactly dtype, shape and data_offsets",
    ),
    # --- payload against the manifest
    (
        "unknown_tensor",
        lambda w: send(w, encoding.encode({**make_delta(0), "model.zzz.router": np.zeros(4, "f4")})),
        INVALID,
        "unknown tensor 'model.zzz.router'",
    ),
    (
        "missing_tensor",
        lambda w: send(w, encoding.encode({k: v for k, v in make_delta(0).items() if k != THIRD})),
        INVALID,
        f"missing tensor '{THIRD}'",
    ),
    (
        "wrong_shape",
        lambda w: send(w, encoding.encode({**make_delta(0), THIRD: np.zeros((1, 4, 17), "f4")})),
        INVALID,
        f"tensor '{THIRD}' has shape [1, 4, 17]",
    ),
    (
        "wrong_dtype_f64",
        lambda w: send(w, tamper(_as_f64)),
        INVALID,
        f"tensor '{FIRST}' has dtype F64, but encoding fp32 requires F32",
    ),
    (
        "fp16_tensors_declared_fp32",
        lambda w: send(w, good_payload("fp16")),
        INVALID,
        "metadata says encoding 'fp16'",
    ),
    (
        "fp16_tensors_without_metadata",
        lambda w: send(w, tamper(lambda h: None, dtype="F16")),
        INVALID,
        "has dtype F16, but encoding fp32 requires F32",
    ),
    (
        "nan_value",
        lambda w: send(w, with_value("fp32", 2, (0, 1, 3), np.nan)),
        INVALID,
        f"tensor '{THIRD}' contains NaN at index [0, 1, 3]",
    ),
    (
        "inf_value",
        lambda w: send(w, with_value("fp32", 0, (0, 0, 0), np.inf)),
        INVALID,
        "+Inf at index [0, 0, 0]",
    ),
    (
        "fp16_nan_value",
        lambda w: send(w, with_value("fp16", 1, (0, 2, 1), np.nan), encoding=pb.ENCODING_FP16),
        INVALID,
        "NaN at index [0, 2, 1]",
    ),
    (
        "int8_missing_scale",
        lambda w: send(w, int8_payload(lambda n, s: None if n == THIRD else s), encoding=pb.ENCODING_INT8),
        INVALID,
        f"missing tensor '{THIRD}:scale'",
    ),
    (
        "int8_nan_scale",
        lambda w: send(
            w, int8_payload(lambda n, s: np.float32(np.nan) if n == FIRST else s), encoding=pb.ENCODING_INT8
        ),
        INVALID,
        "contains NaN",
    ),
    (
        "int8_negative_scale",
        lambda w: send(w, int8_payload(lambda n, s: -s if n == FIRST else s), encoding=pb.ENCODING_INT8),
        INVALID,
        "is negative",
    ),
    (
        "int8_scale_wrong_shape",
        lambda w: send(
            w,
            int8_payload(lambda n, s: np.ones(3, np.float32) if n == FIRST else s),
            encoding=pb.ENCODING_INT8,
        ),
        INVALID,
        f"scale tensor '{FIRST}:scale' must be F32",
    ),
    (
        "scale_tensor_in_fp32_payload",
        lambda w: send(w, tamper(_add_scale)),
        INVALID,
        "scale tensors belong only to int8 payloads",
    ),
    # --- other calls
    (
        "download_unknown_version",
        lambda w: list(
            w.stub.DownloadGeneralist(
                pb.DownloadGeneralistRequest(version=42), metadata=w.md("a"), timeout=10
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        "version 42 does not exist",
    ),
    (
        "download_offset_past_end",
        lambda w: list(
            w.stub.DownloadGeneralist(
                pb.DownloadGeneralistRequest(version=0, offset=10**9), metadata=w.md("a"), timeout=10
            )
        ),
        grpc.StatusCode.OUT_OF_RANGE,
        "past the end",
    ),
    (
        "register_zero_experts",
        lambda w: w.stub.RegisterDevice(
            pb.RegisterDeviceRequest(
                capabilities=pb.DeviceCapabilities(num_experts=0, num_generalists=0, lora_rank=4)
            ),
            metadata=w.md("c"),
            timeout=10,
        ),
        INVALID,
        "num_experts must be >= 1",
    ),
    (
        "register_more_generalists_than_experts",
        lambda w: w.stub.RegisterDevice(
            pb.RegisterDeviceRequest(
                capabilities=pb.DeviceCapabilities(num_experts=1, num_generalists=2, lora_rank=4)
            ),
            metadata=w.md("c"),
            timeout=10,
        ),
        INVALID,
        "num_generalists",
    ),
    (
        "report_nan_loss",
        lambda w: w.stub.ReportMetrics(
            pb.ReportMetricsRequest(round_id=2, train_loss=float("nan")), metadata=w.md("c"), timeout=10
        ),
        INVALID,
        "finite",
    ),
    (
        "report_unknown_round",
        lambda w: w.stub.ReportMetrics(pb.ReportMetricsRequest(round_id=99), metadata=w.md("c"), timeout=10),
        PRECONDITION,
        "round 99 does not exist",
    ),
    (
        "report_too_many_extras",
        lambda w: w.stub.ReportMetrics(
            pb.ReportMetricsRequest(round_id=2, extra={f"m{i}": 1.0 for i in range(65)}),
            metadata=w.md("c"),
            timeout=10,
        ),
        INVALID,
        "at most 64",
    ),
]


def test_there_are_at_least_40_distinct_cases() -> None:
    names = [case[0] for case in CASES]
    assert len(names) == len(set(names)) and len(names) >= 40


@pytest.mark.parametrize(("name", "request_fn", "code", "message"), CASES, ids=[case[0] for case in CASES])
def test_hostile_request(
    world: World, name: str, request_fn: Callable[[World], None], code: grpc.StatusCode, message: str
) -> None:
    state_dir = world.coordinator.state_dir
    before = snapshot(state_dir)
    with pytest.raises(grpc.RpcError) as info:
        request_fn(world)
    assert info.value.code() == code, f"{name}: {info.value.code()} {info.value.details()}"
    assert message in (info.value.details() or ""), f"{name}: {info.value.details()!r}"
    # The server is still up, serving, and nothing it persists has changed.
    health = health_pb2_grpc.HealthStub(world.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    world.coordinator.wait_for(lambda: not any((state_dir / "tmp").iterdir()), timeout=5)
    assert snapshot(state_dir) == before


def test_valid_upload_still_accepted_after_the_barrage(world: World) -> None:
    payload = good_payload()
    response = world.stub.UploadDelta(
        iter([header_msg(world, payload, device="c"), *chunk_msgs(payload)]),
        metadata=world.md("c"),
        timeout=20,
    )
    assert response.round_uploads == 2 and not response.duplicate
