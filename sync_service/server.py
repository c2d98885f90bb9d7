"""The gRPC coordinator: the SyncService servicer and the process around it.

`SyncServicer` translates between protobuf messages and the domain modules (auth, validation, ingest,
rounds, store); every refusal is a `SyncError` turned into a status at one place (`_rpc`), which also
counts it by reason and logs it. `SyncServer` assembles the gRPC server (TLS, limits, health checking,
reflection), the Prometheus endpoint, the round ticker and start-up crash recovery.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sync_service import faults
from sync_service.addresses import is_loopback, split_host_port
from sync_service.admission import UploadSlots
from sync_service.auth import Authenticator
from sync_service.config import ServerConfig
from sync_service.durable import write_atomic
from sync_service.errors import SyncError, invalid, precondition
from sync_service.ingest import UploadReceiver
from sync_service.manifest import Manifest
from sync_service.metrics import SyncMetrics
from sync_service.proto import SERVICE_NAME
from sync_service.proto import sync_pb2 as pb
from sync_service.proto import sync_pb2_grpc as pb_grpc
from sync_service.rounds import RoundManager, TaskView, UploadAck
from sync_service.store import Store, StoreError
from sync_service.thread_names import name_current_thread
from sync_service.validation import ENCODING_ENUMS, check_upload_header, max_upload_bytes

log = logging.getLogger("sync_service.server")

_ROUND_STATES = {
    "open": pb.ROUND_STATE_OPEN,
    "collecting": pb.ROUND_STATE_COLLECTING,
    "aggregating": pb.ROUND_STATE_AGGREGATING,
    "published": pb.ROUND_STATE_PUBLISHED,
    "failed": pb.ROUND_STATE_FAILED,
}
_ACTIONS = {"train": pb.ACTION_TRAIN, "wait": pb.ACTION_WAIT, "done": pb.ACTION_DONE}
_MAX_TEXT = 256
_MAX_EXTRA_METRICS = 64

F = TypeVar("F", bound=Callable[..., Any])


def manifest_messages(manifest: Manifest) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=s.name, shape=list(s.shape), dtype=s.dtype) for s in manifest.values()]


def _now_ms() -> int:
    return int(time.time() * 1000)


class SyncServicer(pb_grpc.SyncServiceServicer):
    def __init__(
        self, store: Store, rounds: RoundManager, metrics: SyncMetrics, config: ServerConfig
    ) -> None:
        self._store = store
        self._rounds = rounds
        self._metrics = metrics
        self._config = config
        self._auth = Authenticator(store)
        self._manifest_pb = manifest_messages(store.manifest)
        self._max_upload = max_upload_bytes(store.manifest, config.max_header_bytes)
        self._inflight: set[str] = set()
        self._inflight_lock = threading.Lock()
        # Up to two devices may long-poll for a slot, if that still leaves two handler threads for the
        # short calls beside the streams.
        parked = max(0, min(2, config.max_workers - config.slots - 2))
        self.slots = UploadSlots(config.slots, parked=parked) if config.slots else None

    # ------------------------------------------------------------------ error boundary

    def _reject(self, method: str, context: grpc.ServicerContext, error: SyncError) -> None:
        self._metrics.rejects.labels(error.code.name, error.reason).inc()
        log.info(
            "request rejected",
            extra={
                "fields": {
                    "method": method,
                    "code": error.code.name,
                    "reason": error.reason,
                    "detail": error.message,
                    "peer": context.peer(),
                }
            },
        )
        context.abort(error.code, error.message)

    @staticmethod
    def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
        """Turn SyncError (and unexpected exceptions) into a status for unary/client-streaming handlers."""

        @functools.wraps(method)
        def wrapper(self: SyncServicer, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return method(self, request, context)
            except SyncError as err:
                error = err
            except grpc.RpcError:
                # The client cancelled or its deadline passed while we read its stream: nobody to answer.
                log.info(
                    "client went away", extra={"fields": {"method": method.__name__, "peer": context.peer()}}
                )
                return None
            except Exception:
                log.exception("internal error", extra={"fields": {"method": method.__name__}})
                error = SyncError(
                    grpc.StatusCode.INTERNAL, "internal error; the coordinator logged the details", "internal"
                )
            self._reject(method.__name__, context, error)
            return None

        return wrapper

    @staticmethod
    def _rpc_stream(method: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        """The same boundary for server-streaming handlers (generators)."""

        @functools.wraps(method)
        def wrapper(self: SyncServicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
                return
            except SyncError as err:
                error = err
            except Exception:
                log.exception("internal error", extra={"fields": {"method": method.__name__}})
                error = SyncError(
                    grpc.StatusCode.INTERNAL, "internal error; the coordinator logged the details", "internal"
                )
            self._reject(method.__name__, context, error)

        return wrapper

    def _device(self, context: grpc.ServicerContext, claimed: str = "", where: str = "device_id") -> str:
        device = self._auth.authenticate(context.invocation_metadata())
        self._auth.check_acting_as(device, claimed, where)
        return device

    # ------------------------------------------------------------------ RPCs

    @_rpc
    def RegisterDevice(self, request: pb.RegisterDeviceRequest, context: grpc.ServicerContext) -> Any:
        device = self._device(context, request.device_id, "RegisterDeviceRequest.device_id")
        caps = request.capabilities
        if caps.num_experts < 1:
            raise invalid("capabilities.num_experts must be >= 1", "bad_capabilities")
        if not 1 <= caps.num_generalists <= caps.num_experts:
            raise invalid(
                "capabilities.num_generalists must be between 1 and num_experts "
                "(a device shares at least one generalist)",
                "bad_capabilities",
            )
        if caps.lora_rank < 1:
            raise invalid("capabilities.lora_rank must be >= 1", "bad_capabilities")
        for field in ("runtime", "runtime_version", "platform"):
            if len(getattr(caps, field)) > _MAX_TEXT:
                raise invalid(
                    f"capabilities.{field} is longer than {_MAX_TEXT} characters", "bad_capabilities"
                )
        record = {
            "num_experts": caps.num_experts,
            "num_generalists": caps.num_generalists,
            "lora_rank": caps.lora_rank,
            "memory_budget_bytes": caps.memory_budget_bytes,
            "runtime": caps.runtime,
            "runtime_version": caps.runtime_version,
            "platform": caps.platform,
        }
        self._store.set_capabilities(device, record)
        log.info("device registered", extra={"fields": {"device": device, **record}})
        return pb.RegisterDeviceResponse(
            device_id=device,
            generalist_version=self._store.latest_generalist().version,
            manifest=self._manifest_pb,
            server_time_unix_ms=_now_ms(),
        )

    @_rpc
    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> Any:
        device = self._device(context, request.device_id, "GetTaskRequest.device_id")
        return self._task_message(self._rounds.task_for(device))

    def _task_message(self, view: TaskView) -> pb.GetTaskResponse:
        response = pb.GetTaskResponse(
            action=_ACTIONS[view.action],
            generalist_version=view.generalist_version,
            uploads_received=view.uploads_received,
            already_uploaded=view.already_uploaded,
            retry_after_ms=int(view.retry_after_s * 1000),
            message=view.message,
            server_time_unix_ms=_now_ms(),
        )
        if view.round is not None:
            cfg = view.round.config
            local = cfg["local"]
            response.round_id = view.round.round_id
            response.round_state = _ROUND_STATES[view.round.state]
            response.deadline_unix_ms = int(view.round.deadline * 1000)
            response.min_devices = int(cfg["min_devices"])
            response.max_upload_bytes = self._max_upload
            response.manifest.extend(self._manifest_pb)
            response.accepted_encodings.extend(ENCODING_ENUMS[name] for name in cfg["encodings"])
            response.local_config.CopyFrom(
                pb.LocalTrainingConfig(
                    local_steps=local["local_steps"],
                    router_every=local["router_every"],
                    router_steps=local["router_steps"],
                    expert_lr=local["expert_lr"],
                    router_lr=local["router_lr"],
                    batch_size=local["batch_size"],
                    extra=local["extra"],
                )
            )
        return response

    @_rpc_stream
    def DownloadGeneralist(
        self, request: pb.DownloadGeneralistRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadGeneralistResponse]:
        self._device(context)
        latest = self._store.latest_generalist()
        version = request.version if request.HasField("version") else latest.version
        row = self._store.get_generalist(version)
        if row is None:
            raise SyncError(
                grpc.StatusCode.NOT_FOUND,
                f"generalist version {version} does not exist; the latest is {latest.version}",
                "unknown_version",
            )
        if request.offset > row.size:
            raise SyncError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"offset {request.offset} is past the end of version {version} ({row.size} bytes)",
                "bad_offset",
            )
        yield pb.DownloadGeneralistResponse(
            info=pb.GeneralistInfo(
                version=row.version,
                total_bytes=row.size,
                payload_sha256=bytes.fromhex(row.sha256),
                encoding=pb.ENCODING_FP32,
                manifest=self._manifest_pb,
            )
        )
        offset, seq = request.offset, 0
        with open(self._store.root / row.path, "rb") as handle:
            handle.seek(offset)
            while data := handle.read(self._config.download_chunk_bytes):
                yield pb.DownloadGeneralistResponse(chunk=pb.Chunk(seq=seq, offset=offset, data=data))
                self._metrics.download_bytes.inc(len(data))
                offset += len(data)
                seq += 1

    @_rpc
    def AcquireUploadSlot(self, request: pb.AcquireUploadSlotRequest, context: grpc.ServicerContext) -> Any:
        device = self._device(context, request.device_id, "AcquireUploadSlotRequest.device_id")
        # Only an unknown round is refused here: a closed round still answers a retried upload from its
        # idempotency record, so that device must be able to get through.
        if self._store.get_round(request.round_id) is None:
            raise precondition(f"round {request.round_id} does not exist (ask GetTask)", "wrong_round")
        if self.slots is None:
            return pb.AcquireUploadSlotResponse(granted=True, retry_after_ms=60_000)
        grant = self.slots.acquire(device)
        self._metrics.slot_requests.labels("granted" if grant.granted else "queued").inc()
        return pb.AcquireUploadSlotResponse(
            granted=grant.granted,
            retry_after_ms=math.ceil(grant.retry_after_s * 1000),
            queue_position=grant.position,
            slots=self.slots.capacity,
        )

    @_rpc
    def UploadDelta(
        self, request_iterator: Iterator[pb.UploadDeltaRequest], context: grpc.ServicerContext
    ) -> Any:
        started = time.perf_counter()
        device = self._device(context)
        # One upload stream per device at a time: a single token cannot tie up the handler threads.
        with self._inflight_lock:
            if device in self._inflight:
                raise SyncError(
                    grpc.StatusCode.ABORTED,
                    f"another upload from device {device!r} is still in progress; retry after it ends",
                    "concurrent_upload",
                )
            self._inflight.add(device)
        try:
            self._enter_slot(device)
            try:
                return self._upload(device, request_iterator, started)
            finally:
                self._leave_slot(device)
        finally:
            with self._inflight_lock:
                self._inflight.discard(device)

    def _enter_slot(self, device: str) -> None:
        """Admit the stream before reading its payload, or refuse it while every slot is spoken for."""
        if self.slots is None:
            return
        grant = self.slots.enter(device)
        if not grant.granted:
            raise SyncError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"all {self.slots.capacity} upload slots are taken or owed to waiting devices "
                f"({grant.position} queued): call AcquireUploadSlot and open the stream once it is granted "
                f"(about {math.ceil(grant.retry_after_s * 1000)} ms from now)",
                "no_upload_slot",
            )

    def _leave_slot(self, device: str) -> None:
        if self.slots is not None:
            self.slots.leave(device)  # idempotent

    def _upload(self, device: str, request_iterator: Iterator[pb.UploadDeltaRequest], started: float) -> Any:
        first = next(request_iterator, None)
        if first is None:
            raise invalid("empty upload stream: send an UploadHeader, then the payload chunks", "no_header")
        if first.WhichOneof("msg") != "header":
            raise invalid(
                "header missing: the first message of an upload must be an UploadHeader", "no_header"
            )
        request = check_upload_header(
            first.header,
            device,
            self._store.manifest,
            self._config.max_header_bytes,
            self._config.rounds.encodings,
        )
        duplicate = self._rounds.admit_upload(request)
        if duplicate is not None:
            log.info(
                "duplicate upload answered", extra={"fields": {"device": device, "round": request.round_id}}
            )
            return self._ack_message(duplicate)
        receiver = UploadReceiver(
            self._store.tmp_dir, request, self._store.manifest, self._config.max_header_bytes
        )
        try:
            expected_seq = 0
            for message in request_iterator:
                kind = message.WhichOneof("msg")
                if kind == "header":
                    raise invalid(
                        "UploadHeader sent twice: only the first message may be a header", "bad_stream"
                    )
                if kind != "chunk":
                    raise invalid(f"empty message at position {expected_seq + 1} of the stream", "bad_stream")
                chunk = message.chunk
                if chunk.seq != expected_seq:
                    what = "duplicate" if chunk.seq < expected_seq else "out-of-order"
                    raise invalid(f"{what} chunk: expected seq {expected_seq}, got {chunk.seq}", "bad_stream")
                if chunk.offset != receiver.received:
                    raise invalid(
                        f"chunk {chunk.seq} has offset {chunk.offset}, expected {receiver.received}",
                        "bad_stream",
                    )
                data = chunk.data  # each access copies the bytes
                if not data:
                    raise invalid(f"chunk {chunk.seq} is empty", "bad_stream")
                receiver.feed(data)
                expected_seq += 1
            # The slot bounds what streams in; the fsyncs and the commit below hold no network buffers,
            # so the next device may start sending while this upload is made durable.
            self._leave_slot(device)
            received = receiver.finish()
            ack = self._rounds.commit_upload(request, received)
        finally:
            receiver.discard()
        if not ack.duplicate:
            self._metrics.uploads.labels(request.encoding).inc()
            self._metrics.upload_bytes.inc(ack.accepted_bytes)
            self._metrics.upload_seconds.observe(time.perf_counter() - started)
        return self._ack_message(ack)

    @staticmethod
    def _ack_message(ack: UploadAck) -> pb.UploadDeltaResponse:
        return pb.UploadDeltaResponse(
            round_id=ack.round_id,
            upload_id=ack.upload_id,
            duplicate=ack.duplicate,
            accepted_bytes=ack.accepted_bytes,
            round_uploads=ack.round_uploads,
            update_norm=ack.update_norm,
            clipped=ack.clipped,
        )

    @_rpc
    def ReportMetrics(self, request: pb.ReportMetricsRequest, context: grpc.ServicerContext) -> Any:
        device = self._device(context, request.device_id, "ReportMetricsRequest.device_id")
        if request.round_id and self._store.get_round(request.round_id) is None:
            raise precondition(f"round {request.round_id} does not exist", "wrong_round")
        values: dict[str, Any] = {}
        for field in ("train_loss", "valid_loss", "perplexity", "step_time_s"):
            if request.HasField(field):
                value = getattr(request, field)
                if not math.isfinite(value):
                    raise invalid(f"{field} must be a finite number, got {value}", "bad_metrics")
                if field in ("perplexity", "step_time_s") and value < 0:
                    raise invalid(f"{field} must be >= 0, got {value}", "bad_metrics")
                values[field] = value
        for field in ("peak_memory_bytes", "local_steps"):
            if request.HasField(field):
                values[field] = getattr(request, field)
        if len(request.extra) > _MAX_EXTRA_METRICS:
            raise invalid(f"at most {_MAX_EXTRA_METRICS} extra metrics per report", "bad_metrics")
        for key, value in request.extra.items():
            if not key or len(key) > 64 or not key.isprintable():
                raise invalid(
                    f"extra metric name {key[:64]!r} must be 1-64 printable characters", "bad_metrics"
                )
            if not math.isfinite(value):
                raise invalid(f"extra metric {key!r} must be finite, got {value}", "bad_metrics")
        if request.extra:
            values["extra"] = dict(request.extra)
        self._store.add_report(device, request.round_id, values)
        self._metrics.reports.inc()
        return pb.ReportMetricsResponse()


def grpc_server_options(max_message_bytes: int, idle_connection_s: float = 120.0) -> list[tuple[str, Any]]:
    """gRPC server options of the coordinator (the benchmark's trivial servicer uses the same)."""
    return [
        # Each TLS connection costs the server ~66 KiB idle and ~200 KiB once it has carried an upload
        # (benchmarks/probe_sync_memory.py); devices that are training or waiting for their turn need
        # no connection, so one without calls is closed (GOAWAY; the client reconnects when needed).
        ("grpc.max_connection_idle_ms", int(idle_connection_s * 1000)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # A second coordinator must fail to bind instead of silently sharing the port.
        ("grpc.so_reuseport", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Connections are recycled (GOAWAY, clients reconnect transparently) after 30 min, and a stream still
        # open 10 min later is ended: a stalled or hostile upload cannot hold a handler thread forever.
        ("grpc.max_connection_age_ms", 30 * 60 * 1000),
        ("grpc.max_connection_age_grace_ms", 10 * 60 * 1000),
        # No BDP probing: with it, gRPC grows every stream's flow-control window to megabytes, so each
        # upload waiting for a handler thread buffers most of its delta in the server (measured with 200
        # concurrent SmolLM2 uploads: 1.2 GB peak RSS with probing, ~120 MB without, and more throughput).
        ("grpc.http2.bdp_probe", 0),
    ]


class SyncServer:
    """One coordinator process: gRPC server, round ticker, metrics endpoint, state-dir lock."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.port: int | None = None
        self.metrics_port: int | None = None
        faults._target()  # fail fast on a mistyped test crash point
        host, _ = split_host_port(config.listen, "listen address")
        if config.insecure and not is_loopback(host):
            raise ValueError(
                f"refusing --insecure on {host!r}: plaintext is only allowed on a loopback address "
                "(127.0.0.1, ::1, localhost); use --tls-cert/--tls-key to listen on a network"
            )
        self._lock_handle = _lock_state_dir(Path(config.state_dir))
        try:
            self.store = Store(config.state_dir)
        except BaseException:
            self._lock_handle.close()
            raise
        self.metrics = SyncMetrics()
        self.rounds = RoundManager(self.store, config.rounds, self.metrics, keep_uploads=config.keep_uploads)
        self.health = health.HealthServicer()
        options = grpc_server_options(config.max_message_bytes, config.idle_connection_s)
        if config.connection_limit:
            options.append(("grpc.max_allowed_incoming_connections", config.connection_limit))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=config.max_workers, thread_name_prefix="sync-rpc", initializer=name_current_thread
            ),
            options=options,
        )
        servicer = SyncServicer(self.store, self.rounds, self.metrics, config)
        if servicer.slots is not None:
            self.metrics.watch_slots(servicer.slots)
        pb_grpc.add_SyncServiceServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._metrics_httpd: Any = None
        self._stopped = threading.Event()

    def start(self) -> None:
        counts = self.store.recover(keep_uploads=self.config.keep_uploads)
        log.info("recovered state", extra={"fields": {"state_dir": str(self.store.root), **counts}})
        host, _ = split_host_port(self.config.listen, "listen address")
        if self.config.insecure:
            bound = self._server.add_insecure_port(self.config.listen)
            # Loud on purpose: a banner on stderr for a human, a warning event for the log pipeline.
            banner = "!" * 78
            print(
                f"{banner}\n!! INSECURE MODE: plaintext gRPC on {host}:{bound}; bearer tokens are not "
                "encrypted.\n!! Loopback only, for development and tests. Use --tls-cert/--tls-key.\n"
                f"{banner}",
                file=sys.stderr,
                flush=True,
            )
            log.warning("insecure mode: no TLS", extra={"fields": {"listen": f"{host}:{bound}"}})
        else:
            assert self.config.tls_cert and self.config.tls_key
            try:
                key = Path(self.config.tls_key).read_bytes()
                cert = Path(self.config.tls_cert).read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read TLS key/certificate: {exc}") from None
            credentials = grpc.ssl_server_credentials([(key, cert)])
            bound = self._server.add_secure_port(self.config.listen, credentials)
        if not bound:
            raise OSError(f"could not listen on {self.config.listen} (address in use or not available?)")
        self.port = bound
        self._server.start()
        self.rounds.start(self.config.tick_interval_s)
        if self.config.metrics_listen:
            from prometheus_client import start_http_server

            m_host, m_port = split_host_port(self.config.metrics_listen, "metrics address")
            httpd, _thread = start_http_server(m_port, m_host.strip("[]"), registry=self.metrics.registry)
            self._metrics_httpd = httpd
            self.metrics_port = httpd.server_port
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "coordinator serving",
            extra={
                "fields": {
                    "listen": f"{host}:{self.port}",
                    "tls": not self.config.insecure,
                    "metrics_port": self.metrics_port,
                    "tensors": len(self.store.manifest),
                    "delta_bytes": self.store.manifest.nbytes,
                    "pid": os.getpid(),
                }
            },
        )
        if self.config.ready_file:
            info = {
                "pid": os.getpid(),
                "port": self.port,
                "metrics_port": self.metrics_port,
                "target": f"{host}:{self.port}",
            }
            path = Path(self.config.ready_file)
            write_atomic(path, [json.dumps(info).encode()], path.parent)

    def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self._server.stop(self.config.grace_s if grace is None else grace).wait()
        self.rounds.stop()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        self.store.close()
        self._lock_handle.close()
        log.info("coordinator stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> SyncServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


def _lock_state_dir(state_dir: Path) -> Any:
    """Hold an exclusive lock on the state directory for the life of the process.

    Two coordinators on one state directory would interleave rounds; the kernel drops the lock when the
    process dies, even by SIGKILL, so a crashed coordinator never blocks its own restart.
    """
    if not Store.is_initialised(state_dir):
        raise StoreError(
            f"{state_dir} is not an initialised sync state directory "
            f"(run `comigs sync init --state-dir {state_dir} --generalist FILE.safetensors`)"
        )
    handle = open(state_dir / "coordinator.lock", "a+")  # noqa: SIM115 - held until stop()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise StoreError(f"another coordinator (pid {holder}) is already serving {state_dir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
