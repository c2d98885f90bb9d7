"""`SyncClient`: the device side of the sync protocol (torch-free: tensors are numpy arrays).

A device agent uses it like this::

    client = SyncClient("coordinator.example:50051", token, ca_file="ca.pem",
                        state_path="~/.comigs/sync-state.json")
    client.register(Capabilities(num_experts=2, num_generalists=1, lora_rank=8, runtime="torch-eager"))
    task = client.wait_for_task()                      # blocks while the coordinator says WAIT
    if task.action == "train":
        generalist = client.download_generalist(task.generalist_version)
        delta = train_locally(generalist.tensors, task.local_config)   # dict[str, np.ndarray]
        client.upload_delta(task.round_id, task.generalist_version, delta, num_samples=n, encoding="int8")

Reliability built in:

* retries with exponential backoff (jittered) on transient errors only: UNAVAILABLE, DEADLINE_EXCEEDED,
  RESOURCE_EXHAUSTED, ABORTED; everything else (bad token, invalid delta, late upload) raises at once;
* chunked transfers; a broken download resumes from the last byte received;
* upload admission: before each upload attempt the client queues for one of the coordinator's upload
  slots (`AcquireUploadSlot`), sleeping as long as the coordinator says its turn will take;
* idempotent uploads: the idempotency key of a round is persisted in `state_path` *before* the upload
  starts, so a device that crashes and restarts re-sends with the same key and the coordinator counts the
  delta once (it answers the retry with the original acknowledgement, `duplicate=True`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from edge_runtime import roles
from sync_service import encoding as wire
from sync_service.addresses import is_loopback_target
from sync_service.proto import sync_pb2 as pb
from sync_service.proto import sync_pb2_grpc as pb_grpc

T = TypeVar("T")

TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
_ENCODINGS = {"fp32": pb.ENCODING_FP32, "fp16": pb.ENCODING_FP16, "int8": pb.ENCODING_INT8}
_ENCODING_NAMES = {value: name for name, value in _ENCODINGS.items()}
_ACTIONS = {pb.ACTION_TRAIN: "train", pb.ACTION_WAIT: "wait", pb.ACTION_DONE: "done"}
_ROUND_STATES = {
    pb.ROUND_STATE_OPEN: "open",
    pb.ROUND_STATE_COLLECTING: "collecting",
    pb.ROUND_STATE_AGGREGATING: "aggregating",
    pb.ROUND_STATE_PUBLISHED: "published",
    pb.ROUND_STATE_FAILED: "failed",
}
#: 64 KiB: large enough that per-message overhead is small, small enough that a coordinator serving
#: hundreds of concurrent uploads holds little memory per stream (see sync_service/README.md).
DEFAULT_CHUNK_BYTES = 64 * 1024
#: Told to wait at least this long (for an upload slot, for the next round), a device hangs up until it
#: asks again: a reconnect (one TLS handshake, ~1 ms of coordinator CPU) is cheap next to the connection
#: state a coordinator would hold meanwhile (~65-200 KiB per TLS connection), and a coordinator at its
#: connection limit needs sleepers to make room for the devices whose turn has come. 0.25 s against 1 s
#: measured no clear difference (benchmarks/RESULTS.md, session 14: slightly less memory, the same
#: ingest within the noise); the shorter wait is kept for the room it leaves at the limit.
#: The edge agent also hangs up for the length of its local training.
HANG_UP_WAIT_S = 0.25


class SyncError(Exception):
    """A call that failed for good: the gRPC code, the coordinator's message, whether it was transient."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, attempts: int) -> None:
        self.method = method
        self.code = code
        self.details = details
        self.attempts = attempts
        self.transient = code in TRANSIENT_CODES
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{method} failed{tries}: {code.name}: {details}")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: attempt n waits initial * multiplier**n (capped), times a random 0.5-1.0."""

    max_attempts: int = 6
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    multiplier: float = 2.0

    def delay(self, retry: int, rng: random.Random) -> float:
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return ceiling * rng.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Capabilities:
    num_experts: int
    num_generalists: int = 1
    lora_rank: int = 8
    memory_budget_bytes: int = 0
    runtime: str = ""
    runtime_version: str = ""
    platform: str = ""


@dataclass(frozen=True)
class Task:
    """What the coordinator wants now. `action` is "train", "wait" or "done"."""

    action: str
    round_id: int
    round_state: str | None
    deadline: float | None
    generalist_version: int
    local_config: dict[str, Any]
    manifest: dict[str, tuple[tuple[int, ...], str]]
    accepted_encodings: tuple[str, ...]
    max_upload_bytes: int
    retry_after_s: float
    already_uploaded: bool
    message: str
    min_devices: int
    uploads_received: int


@dataclass(frozen=True)
class Generalist:
    version: int
    tensors: dict[str, np.ndarray]
    sha256: str


@dataclass(frozen=True)
class UploadResult:
    round_id: int
    upload_id: str
    duplicate: bool
    accepted_bytes: int
    round_uploads: int
    update_norm: float
    clipped: bool


@dataclass
class _State:
    """What survives a device restart: the idempotency key per round (persisted before uploading)."""

    path: Path | None
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, path: Path | None) -> _State:
        if path is None or not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read sync client state {path}: {exc}") from None
        return cls(path, dict(data.get("uploads", {})))

    def save(self) -> None:
        if self.path is None:
            return
        keep = sorted(self.uploads, key=int)[-16:]  # a few recent rounds are enough to resume
        self.uploads = {k: self.uploads[k] for k in keep}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump({"uploads": self.uploads}, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _refuse_private_tensors(payload: bytes) -> None:
    """The last check before the wire: specialists and routers never leave the device, whoever asks.

    Reads only the payload's header (names; under a millisecond for a SmolLM2 delta); the naming
    contract decides from the name alone. A malformed payload is refused here too, rather than by the
    coordinator after it was sent.
    """
    decoder = wire.PayloadDecoder()
    decoder.feed_header(payload)
    if decoder.header is None:
        raise ValueError(f"payload of {len(payload)} bytes ends inside its header: not an encoded delta")
    try:  # an int8 scale counts as the tensor it scales
        roles.check_shared(entry.name.removesuffix(wire.SCALE_SUFFIX) for entry in decoder.header.entries)
    except ValueError as exc:
        raise ValueError(f"refusing to upload this payload: {exc}") from None


class SyncClient:
    """A connection to one coordinator, acting as the device that owns `token`.

    TLS by default (`ca_file`/`root_certificates` for a private CA, the system roots otherwise;
    `server_name` overrides the name checked in the certificate). `insecure=True` is refused for
    anything but a loopback target, because the bearer token would travel in plaintext.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        device_id: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
        insecure: bool = False,
        state_path: str | os.PathLike[str] | None = None,
        retry: RetryPolicy | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        rpc_timeout_s: float = 30.0,
        transfer_timeout_s: float = 600.0,
        channel_options: Sequence[tuple[str, Any]] = (),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not token:
            raise ValueError("a device token is required (from `comigs sync add-device NAME`)")
        if not 1024 <= chunk_bytes <= 4 * 1024 * 1024:
            raise ValueError("chunk_bytes must be between 1 KiB and 4 MiB (the coordinator's message limit)")
        self.target = target
        self.device_id = device_id or ""
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),)
        if device_id:
            self._metadata += (("x-comigs-device-id", device_id),)
        self._retry = retry or RetryPolicy()
        self._chunk_bytes = chunk_bytes
        self._rpc_timeout = rpc_timeout_s
        self._transfer_timeout = transfer_timeout_s
        self._sleep = sleep
        self._rng = random.Random()
        self._use_slots = True
        self._state = _State.load(Path(state_path).expanduser() if state_path else None)
        options = [
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
            ("grpc.max_send_message_length", 8 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # Each channel owns its connection. With gRPC's default global subchannel pool, a channel
            # opened right after `close()` can pick up the closing channel's still-live connection,
            # so hanging up (while queued, after an upload) would keep the TLS state on the server.
            ("grpc.use_local_subchannel_pool", 1),
            *channel_options,
        ]
        if insecure:
            if not is_loopback_target(target):
                raise ValueError(
                    f"refusing an insecure channel to {target!r}: only loopback targets may skip TLS"
                )
            self._open_channel: Callable[[], grpc.Channel] = lambda: grpc.insecure_channel(target, options=options)
        else:
            if ca_file is not None:
                root_certificates = Path(ca_file).read_bytes()
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._open_channel = lambda: grpc.secure_channel(target, credentials, options=options)
        self._channel_lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub_of_channel: pb_grpc.SyncServiceStub | None = None

    # ------------------------------------------------------------------ plumbing

    @property
    def _stub(self) -> pb_grpc.SyncServiceStub:
        """The stub of the open channel; (re)connects lazily, so `close()` is cheap to undo."""
        with self._channel_lock:
            if self._stub_of_channel is None:
                self._channel = self._open_channel()
                self._stub_of_channel = pb_grpc.SyncServiceStub(self._channel)
            return self._stub_of_channel

    def close(self) -> None:
        """Close the connection. The client stays usable: the next call opens a new one.

        Also done after every acknowledged upload: a device then waits minutes for the round, and
        the coordinator holds ~130-200 KiB of TLS state for each connection that has carried a delta
        until that connection closes (sync_service/README.md, gRPC tuning); a new connection costs
        one TLS handshake.
        """
        with self._channel_lock:
            channel, self._channel, self._stub_of_channel = self._channel, None, None
        if channel is not None:
            channel.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, attempt: Callable[[], T]) -> T:
        """Run `attempt` with retries on transient status codes; raise SyncError otherwise."""
        tries = 0
        while True:
            tries += 1
            try:
                return attempt()
            except grpc.RpcError as exc:
                code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
                details = (exc.details() if callable(getattr(exc, "details", None)) else None) or str(exc)
                if code not in TRANSIENT_CODES or tries >= self._retry.max_attempts:
                    raise SyncError(method, code, details, tries) from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    # Drop the connection: the retry connects afresh after our backoff, instead of
                    # failing fast until gRPC's own reconnect backoff (1 s, growing) has passed.
                    self.close()
                self._sleep(self._retry.delay(tries - 1, self._rng))

    # ------------------------------------------------------------------ API

    def register(self, capabilities: Capabilities) -> dict[str, tuple[tuple[int, ...], str]]:
        """Tell the coordinator what this device is; returns the manifest of exchanged tensors."""
        request = pb.RegisterDeviceRequest(
            device_id=self.device_id,
            capabilities=pb.DeviceCapabilities(
                num_experts=capabilities.num_experts,
                num_generalists=capabilities.num_generalists,
                lora_rank=capabilities.lora_rank,
                memory_budget_bytes=capabilities.memory_budget_bytes,
                runtime=capabilities.runtime,
                runtime_version=capabilities.runtime_version,
                platform=capabilities.platform,
            ),
        )
        response = self._call(
            "RegisterDevice",
            lambda: self._stub.RegisterDevice(request, metadata=self._metadata, timeout=self._rpc_timeout),
        )
        if not self.device_id:
            self.device_id = response.device_id
        return {spec.name: (tuple(spec.shape), spec.dtype) for spec in response.manifest}

    def get_task(self) -> Task:
        response = self._call(
            "GetTask",
            lambda: self._stub.GetTask(
                pb.GetTaskRequest(device_id=self.device_id),
                metadata=self._metadata,
                timeout=self._rpc_timeout,
            ),
        )
        local = response.local_config
        return Task(
            action=_ACTIONS.get(response.action, "wait"),
            round_id=response.round_id,
            round_state=_ROUND_STATES.get(response.round_state),
            deadline=response.deadline_unix_ms / 1000 if response.deadline_unix_ms else None,
            generalist_version=response.generalist_version,
            local_config={
                "local_steps": local.local_steps,
                "router_every": local.router_every,
                "router_steps": local.router_steps,
                "expert_lr": local.expert_lr,
                "router_lr": local.router_lr,
                "batch_size": local.batch_size,
                "extra": dict(local.extra),
            },
            manifest={spec.name: (tuple(spec.shape), spec.dtype) for spec in response.manifest},
            accepted_encodings=tuple(
                _ENCODING_NAMES[e] for e in response.accepted_encodings if e in _ENCODING_NAMES
            ),
            max_upload_bytes=response.max_upload_bytes,
            retry_after_s=response.retry_after_ms / 1000,
            already_uploaded=response.already_uploaded,
            message=response.message,
            min_devices=response.min_devices,
            uploads_received=response.uploads_received,
        )

    def wait_for_task(
        self, timeout_s: float | None = None, stop: threading.Event | None = None, max_poll_s: float = 60.0
    ) -> Task:
        """Poll GetTask until the answer is "train" or "done" (honouring retry_after), or time out.

        Returns the last "wait" task if `timeout_s` passes or `stop` is set first. Hangs up while it
        waits (`idle`).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            task = self.get_task()
            if task.action != "wait":
                return task
            pause = min(max(task.retry_after_s, 0.05), max_poll_s)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return task
                pause = min(pause, remaining)
            if self.idle(pause, stop):
                return task

    def idle(self, seconds: float, stop: threading.Event | None = None) -> bool:
        """Wait `seconds` with nothing to say, hanging up first if that is `HANG_UP_WAIT_S` or longer (the
        next call reconnects): the coordinator then holds no connection state for this device meanwhile.
        True if `stop` was set during the wait."""
        if seconds >= HANG_UP_WAIT_S:
            self.close()
        if stop is not None:
            return stop.wait(seconds)
        self._sleep(seconds)
        return False

    def download_generalist(self, version: int | None = None) -> Generalist:
        """Download (and verify) a generalist version, the latest if None; resumes after transient errors."""
        received = bytearray()
        info: dict[str, Any] = {}

        def attempt() -> None:
            request = pb.DownloadGeneralistRequest(offset=len(received))
            pinned = info.get("version", version)
            if pinned is not None:
                request.version = pinned
            stream = self._stub.DownloadGeneralist(
                request, metadata=self._metadata, timeout=self._transfer_timeout
            )
            for message in stream:
                if message.WhichOneof("msg") == "info":
                    if info and (info["version"], info["sha256"]) != (
                        message.info.version,
                        message.info.payload_sha256,
                    ):
                        raise RuntimeError("the coordinator changed the generalist during a resumed download")
                    info.update(
                        version=message.info.version,
                        sha256=message.info.payload_sha256,
                        total=message.info.total_bytes,
                    )
                else:
                    chunk = message.chunk
                    if chunk.offset != len(received):
                        raise RuntimeError(
                            f"download chunk at offset {chunk.offset}, expected {len(received)}"
                        )
                    received.extend(chunk.data)

        self._call("DownloadGeneralist", attempt)
        if not info or len(received) != info["total"]:
            raise SyncError(
                "DownloadGeneralist",
                grpc.StatusCode.DATA_LOSS,
                f"received {len(received)} of {info.get('total', '?')} bytes",
                1,
            )
        digest = hashlib.sha256(received).digest()
        if digest != info["sha256"]:
            raise SyncError(
                "DownloadGeneralist", grpc.StatusCode.DATA_LOSS, "generalist checksum mismatch", 1
            )
        return Generalist(info["version"], wire.decode(bytes(received)), digest.hex())

    def upload_delta(
        self,
        round_id: int,
        base_version: int,
        delta: Mapping[str, np.ndarray],
        num_samples: int,
        *,
        encoding: str = "fp32",
        int8_granularity: str = "auto",
        idempotency_key: str | None = None,
    ) -> UploadResult:
        """Upload this device's generalist delta for `round_id` (computed against `base_version`).

        The payload is encoded once; retries re-send it with the same idempotency key. Without an explicit
        key, the key for this round is read from (or created in) the state file, so the call is safe to
        repeat after a device restart.
        """
        if encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(_ENCODINGS)}, got {encoding!r}")
        payload = wire.encode(delta, encoding, int8_granularity=int8_granularity)
        return self.upload_encoded(
            round_id, base_version, payload, num_samples, encoding=encoding, idempotency_key=idempotency_key
        )

    def upload_encoded(
        self,
        round_id: int,
        base_version: int,
        payload: bytes,
        num_samples: int,
        *,
        encoding: str,
        idempotency_key: str | None = None,
    ) -> UploadResult:
        """Upload an already encoded payload (see `sync_service.encoding`), e.g. one a native runtime wrote.

        Same retry and idempotency behaviour as `upload_delta`; the coordinator validates the bytes.
        """
        if encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(_ENCODINGS)}, got {encoding!r}")
        _refuse_private_tensors(payload)
        digest = hashlib.sha256(payload).digest()
        key = idempotency_key or self._key_for(round_id, base_version)
        header = pb.UploadHeader(
            device_id=self.device_id,
            round_id=round_id,
            base_version=base_version,
            num_samples=num_samples,
            encoding=_ENCODINGS[encoding],
            idempotency_key=key,
            total_bytes=len(payload),
            payload_sha256=digest,
        )

        def attempt() -> pb.UploadDeltaResponse:
            self._wait_for_slot(round_id)
            return self._stub.UploadDelta(
                self._chunks(header, payload), metadata=self._metadata, timeout=self._transfer_timeout
            )

        response = self._call("UploadDelta", attempt)
        self.close()  # nothing to send until the round publishes: give the coordinator its memory back
        with self._state.lock:
            entry = self._state.uploads.get(str(round_id))
            if entry is not None and entry["key"] == key:
                entry.update(acknowledged=True, upload_id=response.upload_id)
                self._state.save()
        return UploadResult(
            round_id=response.round_id,
            upload_id=response.upload_id,
            duplicate=response.duplicate,
            accepted_bytes=response.accepted_bytes,
            round_uploads=response.round_uploads,
            update_norm=response.update_norm,
            clipped=response.clipped,
        )

    def report_metrics(
        self,
        round_id: int,
        *,
        train_loss: float | None = None,
        valid_loss: float | None = None,
        perplexity: float | None = None,
        step_time_s: float | None = None,
        peak_memory_bytes: int | None = None,
        local_steps: int | None = None,
        extra: Mapping[str, float] | None = None,
    ) -> None:
        request = pb.ReportMetricsRequest(
            device_id=self.device_id, round_id=round_id, extra=dict(extra or {})
        )
        for name, value in (
            ("train_loss", train_loss),
            ("valid_loss", valid_loss),
            ("perplexity", perplexity),
            ("step_time_s", step_time_s),
            ("peak_memory_bytes", peak_memory_bytes),
            ("local_steps", local_steps),
        ):
            if value is not None:
                setattr(request, name, value)
        self._call(
            "ReportMetrics",
            lambda: self._stub.ReportMetrics(request, metadata=self._metadata, timeout=self._rpc_timeout),
        )

    # ------------------------------------------------------------------ helpers

    def _key_for(self, round_id: int, base_version: int) -> str:
        with self._state.lock:
            entry = self._state.uploads.get(str(round_id))
            if entry is not None and entry.get("base_version") == base_version:
                return str(entry["key"])
            key = f"{self.device_id or 'device'}-r{round_id}-{uuid.uuid4().hex}"[-128:]
            self._state.uploads[str(round_id)] = {
                "base_version": base_version,
                "key": key,
                "acknowledged": False,
            }
            self._state.save()  # durable before the first byte is sent
            return key

    def _wait_for_slot(self, round_id: int) -> None:
        """Queue for one of the coordinator's upload slots; return once granted.

        The coordinator streams a bounded number of uploads at once and tells the others when their
        turn should come, so waiting costs neither side memory: told to wait `HANG_UP_WAIT_S` or longer,
        the client also closes its connection (the coordinator keeps ~65-200 KiB of TLS state per open
        connection) and reconnects when it asks again. Every attempt (retries included) queues again: a
        slot is only held for a short while. Coordinators without admission control answer
        UNIMPLEMENTED, and the client stops asking.
        """
        if not self._use_slots:
            return
        request = pb.AcquireUploadSlotRequest(device_id=self.device_id, round_id=round_id)
        deadline = time.monotonic() + self._transfer_timeout
        while True:
            try:
                grant = self._stub.AcquireUploadSlot(
                    request, metadata=self._metadata, timeout=self._rpc_timeout
                )
            except grpc.RpcError as exc:
                if callable(getattr(exc, "code", None)) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._use_slots = False
                    return
                raise
            if grant.granted:
                return
            wait = grant.retry_after_ms / 1000 * self._rng.uniform(1.0, 1.1)  # de-synchronise the queue
            if time.monotonic() + wait > deadline:
                raise SyncError(
                    "AcquireUploadSlot",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no upload slot within {self._transfer_timeout:.0f} s ({grant.queue_position} devices "
                    f"ahead, {grant.slots} slots); try again later",
                    1,
                )
            self.idle(wait)  # queued: hung up while we sleep, if the wait is long enough

    def _chunks(self, header: pb.UploadHeader, payload: bytes) -> Iterator[pb.UploadDeltaRequest]:
        yield pb.UploadDeltaRequest(header=header)
        view = memoryview(payload)
        for seq, offset in enumerate(range(0, len(payload), self._chunk_bytes)):
            data = bytes(view[offset : offset + self._chunk_bytes])
            yield pb.UploadDeltaRequest(chunk=pb.Chunk(seq=seq, offset=offset, data=data))
