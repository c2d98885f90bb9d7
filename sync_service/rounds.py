"""The round state machine: open -> collecting -> aggregating -> published (or failed).

One lock orders every decision that depends on time and on the set of uploads: committing an upload,
passing a deadline, extending, closing. Each decision first *advances* the state machine to "now", so an
upload that completes a second after the deadline is late even if the ticker thread has not woken up yet,
and the outcome of a race never depends on thread scheduling.

Aggregation runs on the ticker thread outside that lock (the round is "aggregating", so nothing can
change its uploads) and is deterministic: uploads are folded in device-id order from their durable files,
so a crash at any point followed by a restart republishes bit-identical bytes.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from sync_service import encoding as enc
from sync_service.aggregation import TensorwiseMean
from sync_service.config import RoundConfig
from sync_service.durable import publish_file, write_atomic
from sync_service.errors import SyncError, precondition
from sync_service.faults import crash_point
from sync_service.ingest import ReceivedUpload
from sync_service.metrics import SyncMetrics
from sync_service.store import RoundRow, Store, UploadRow
from sync_service.thread_names import name_current_thread
from sync_service.validation import UploadRequest

log = logging.getLogger("sync_service.rounds")

#: Aggregation errors are retried this many times before the round is failed with the error as reason.
MAX_AGGREGATION_ATTEMPTS = 3
#: Up to this many uploads keep a file descriptor open during aggregation; more are reopened per read.
MAX_OPEN_UPLOADS = 256


@dataclass(frozen=True)
class TaskView:
    """The answer to "what should this device do now?", independent of the wire format."""

    action: str  # "train", "wait" or "done"
    round: RoundRow | None
    generalist_version: int
    uploads_received: int
    already_uploaded: bool
    retry_after_s: float
    message: str


@dataclass(frozen=True)
class UploadAck:
    round_id: int
    upload_id: str
    duplicate: bool
    accepted_bytes: int
    round_uploads: int
    update_norm: float
    clipped: bool


class RoundManager:
    def __init__(
        self,
        store: Store,
        config: RoundConfig,
        metrics: SyncMetrics | None = None,
        *,
        keep_uploads: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self._keep_uploads = keep_uploads
        self._clock = clock
        self._lock = threading.RLock()
        self._queue_lock = threading.Lock()
        self._commit_queue: list[_PendingCommit] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures: dict[int, int] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self, tick_interval_s: float) -> None:
        """Tick on a thread: first resume whatever the last run left (e.g. re-aggregate), then keep time."""
        self._thread = threading.Thread(
            target=self._run, args=(tick_interval_s,), name="sync-rounds", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self, tick_interval_s: float) -> None:
        name_current_thread()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep the coordinator alive; the next tick retries
                log.exception("round tick failed")
            self._wake.wait(tick_interval_s)
            self._wake.clear()

    def tick(self) -> None:
        """Apply due transitions; aggregate a round that is waiting for it."""
        with self._lock:
            self._advance_locked()
            current = self._store.current_round()
        if current is not None and current.state == "aggregating":
            self._aggregate(current)
            with self._lock:
                self._advance_locked()

    @property
    def done(self) -> bool:
        return 0 < self._config.rounds <= self._store.count_rounds("published")

    # ------------------------------------------------------------------ state machine

    def _advance_locked(self, update_metrics: bool = True) -> None:
        for _ in range(8):  # a handful of transitions at most per call (e.g. fail, then open the next)
            if not self._step_locked(self._clock()):
                break
        if update_metrics and self._metrics is not None:
            current = self._store.current_round()
            if current is not None:
                self._metrics.current_round.set(current.round_id)
                self._metrics.round_uploads.set(self._store.count_uploads(current.round_id))
            self._metrics.generalist_version.set(self._store.latest_generalist().version)
            self._metrics.devices.set(self._store.count_active_devices())

    def _step_locked(self, now: float) -> bool:
        current = self._store.current_round()
        if current is None:
            if self.done:
                return False
            base = self._store.latest_generalist().version
            opened = self._store.open_round(
                base, now + self._config.round_timeout_s, self._config.snapshot(), now
            )
            log.info(
                "round opened",
                extra={
                    "fields": {
                        "round": opened.round_id,
                        "base_version": base,
                        "deadline": round(opened.deadline, 3),
                    }
                },
            )
            return True
        if not current.accepting:
            return False
        cfg = current.config
        uploads = self._store.count_uploads(current.round_id)
        min_devices = int(cfg["min_devices"])
        if (
            cfg.get("early_close", True)
            and uploads >= min_devices
            and uploads >= self._store.count_active_devices()
        ):
            self._close_locked(current, now, f"all {uploads} enrolled devices uploaded")
            return True
        if now < current.deadline:
            return False
        if uploads >= min_devices:
            self._close_locked(
                current, now, f"deadline reached with quorum ({uploads}/{min_devices} uploads)"
            )
            return True
        if current.extensions < int(cfg["max_extensions"]):
            deadline = max(current.deadline, now) + float(cfg["extension_s"])
            detail = (
                f"only {uploads}/{min_devices} uploads at the deadline; extension "
                f"{current.extensions + 1}/{cfg['max_extensions']} until {deadline:.3f}"
            )
            self._store.update_round(
                current.round_id,
                "extended",
                detail,
                now,
                deadline=deadline,
                extensions=current.extensions + 1,
            )
            log.warning(
                "round extended",
                extra={"fields": {"round": current.round_id, "uploads": uploads, "min_devices": min_devices}},
            )
            if self._metrics is not None:
                self._metrics.round_extensions.inc()
            return True
        reason = (
            f"quorum not reached: {uploads}/{min_devices} uploads by the deadline after "
            f"{current.extensions} extension(s)"
        )
        self._store.update_round(
            current.round_id, "failed", reason, now, state="failed", closed_at=now, reason=reason
        )
        log.warning("round failed", extra={"fields": {"round": current.round_id, "reason": reason}})
        if self._metrics is not None:
            self._metrics.rounds.labels("failed").inc()
        if not self._keep_uploads:
            self._store.drop_round_uploads(current.round_id)
        return True

    def _close_locked(self, current: RoundRow, now: float, reason: str) -> None:
        self._store.update_round(
            current.round_id, "aggregating", reason, now, state="aggregating", reason=reason
        )
        log.info("round closed", extra={"fields": {"round": current.round_id, "reason": reason}})
        self._wake.set()

    # ------------------------------------------------------------------ aggregation

    def _aggregate(self, current: RoundRow) -> None:
        started = time.perf_counter()
        try:
            version = self._publish(current)
        except Exception as exc:
            attempts = self._failures.get(current.round_id, 0) + 1
            self._failures[current.round_id] = attempts
            log.exception(
                "aggregation failed", extra={"fields": {"round": current.round_id, "attempt": attempts}}
            )
            if attempts >= MAX_AGGREGATION_ATTEMPTS:
                now = self._clock()
                reason = f"aggregation failed {attempts} times: {type(exc).__name__}: {exc}"
                with self._lock:
                    self._store.update_round(
                        current.round_id, "failed", reason, now, state="failed", closed_at=now, reason=reason
                    )
                if self._metrics is not None:
                    self._metrics.rounds.labels("failed").inc()
            return
        elapsed = time.perf_counter() - started
        if self._metrics is not None:
            self._metrics.aggregation_seconds.observe(elapsed)
            self._metrics.rounds.labels("published").inc()
            self._metrics.generalist_version.set(version)
        log.info(
            "round published",
            extra={"fields": {"round": current.round_id, "version": version, "seconds": round(elapsed, 3)}},
        )

    def _publish(self, current: RoundRow) -> int:
        """Average the round's uploads into a new generalist file, then commit it.

        Streams tensor by tensor (`TensorwiseMean`): for each tensor name, every upload file is read at that
        tensor only, so memory stays at one tensor whatever the model or the number of devices. Uploads are
        folded in device-id order, the same order on every run, hence bit-identical output after a crash.
        """
        store = self._store
        uploads = store.uploads_for_round(current.round_id)  # sorted by device id: deterministic
        base = store.get_generalist(current.base_version)
        if base is None:
            raise RuntimeError(f"base generalist version {current.base_version} is missing")
        version = current.base_version + 1
        relpath = store.generalist_relpath(version)
        names = list(store.manifest)
        keep_open = len(uploads) <= MAX_OPEN_UPLOADS
        readers = [enc.IndexedPayloadFile(store.root / u.path, names, keep_open=keep_open) for u in uploads]
        try:
            sources = [
                (_Scaled(r, u.clip_scale), u.num_samples) for r, u in zip(readers, uploads, strict=True)
            ]
            delta = TensorwiseMean(current.config["strategy"], store.manifest.as_shapes(), sources)
            with enc.TensorFile(store.root / base.path) as previous:
                pieces = enc.encode_iter(
                    _Sum(previous, delta, on_tensor=lambda index: crash_point("aggregate.after_tensor")),
                    "fp32",
                    metadata={"version": str(version), "round": str(current.round_id)},
                )
                sha, size = write_atomic(store.root / relpath, pieces, store.tmp_dir)
        finally:
            for reader in readers:
                reader.close()
        crash_point("publish.before_commit")
        with self._lock:
            store.publish(current.round_id, version, relpath, sha, size, self._clock())
        if not self._keep_uploads:
            store.drop_round_uploads(current.round_id)
        return version

    # ------------------------------------------------------------------ device-facing decisions

    def task_for(self, device_id: str) -> TaskView:
        with self._lock:
            self._advance_locked(update_metrics=False)
            current = self._store.current_round()
            latest = self._store.latest_generalist().version
            poll = self._config.poll_interval_s
            if current is None:
                if self.done:
                    published = self._store.count_rounds("published")
                    return TaskView(
                        "done",
                        None,
                        latest,
                        0,
                        False,
                        0.0,
                        f"training is finished: {published} rounds published",
                    )
                return TaskView("wait", None, latest, 0, False, poll, "no round is open yet")
            uploads = self._store.count_uploads(current.round_id)
            if current.state == "aggregating":
                return TaskView(
                    "wait",
                    current,
                    current.base_version,
                    uploads,
                    self._uploaded(current, device_id),
                    min(poll, 1.0),
                    f"round {current.round_id} is being aggregated",
                )
            if self._uploaded(current, device_id):
                until_deadline = max(current.deadline - self._clock(), 0.0)
                return TaskView(
                    "wait",
                    current,
                    current.base_version,
                    uploads,
                    True,
                    max(min(poll, until_deadline + 0.1), 0.1),
                    f"your delta for round {current.round_id} is in; waiting for the round to close",
                )
            return TaskView(
                "train",
                current,
                current.base_version,
                uploads,
                False,
                0.0,
                f"train on generalist version {current.base_version} and upload before the deadline",
            )

    def _uploaded(self, current: RoundRow, device_id: str) -> bool:
        return self._store.upload_for(current.round_id, device_id) is not None

    def admit_upload(self, request: UploadRequest) -> UploadAck | None:
        """Early check when the upload header arrives: the duplicate's ack, or None to go on receiving.

        Raises SyncError for a request that cannot succeed, so the device does not stream megabytes only
        to be refused at the end. Read-only and lock-free (hundreds of devices may start uploading at the
        same instant); `commit_upload` re-checks everything under the lock.
        """
        return self._check(request, payload_sha256=request.payload_sha256)

    def commit_upload(self, request: UploadRequest, received: ReceivedUpload) -> UploadAck:
        """Make a received upload count: durable file, committed row, then the acknowledgement.

        The file gets its final, unique name outside the lock (rename + directory fsync are the slow part);
        only the decision and the database commit are serialised. A file whose commit is then refused, or
        never happens because of a crash, is deleted here or by start-up recovery.

        Group commit: uploads that finish while another commit holds the lock queue up, and whoever takes
        the lock next decides and commits every queued upload in one SQLite transaction (one WAL fsync).
        Each caller still returns only after the transaction holding its row committed, so the durability
        guarantee is the same as committing one by one; under load it takes the serialised part (a dozen
        queries and an fsync per upload, each a GIL hand-off) off the critical path.
        """
        upload_id = uuid.uuid4().hex
        relpath = (
            self._store.round_upload_dir(request.round_id).relative_to(self._store.root)
            / f"{request.device_id}-{upload_id}.safetensors"
        )
        final_path = self._store.root / relpath
        publish_file(received.temp_path, final_path)
        crash_point("upload.before_commit")
        pending = _PendingCommit(request, received, upload_id, str(relpath), final_path)
        with self._queue_lock:
            self._commit_queue.append(pending)
        with self._lock:
            while not pending.done:  # normally once; again if this upload was deferred to the next batch
                with self._queue_lock:
                    batch, self._commit_queue = self._commit_queue, []
                self._commit_batch_locked(batch)
        if pending.error is not None:
            raise pending.error
        assert pending.ack is not None
        return pending.ack

    def _commit_batch_locked(self, batch: list[_PendingCommit]) -> None:
        """Decide and commit queued uploads (caller holds the lock); each ends `done` or is re-queued."""
        counts: dict[int, int] = {}
        deferred: list[_PendingCommit] = []
        try:
            self._advance_locked(update_metrics=False)
            accepted: list[tuple[_PendingCommit, UploadRow]] = []
            devices: set[str] = set()
            for item in batch:
                request = item.request
                if request.device_id in devices:
                    # A second upload of the same device in this batch (impossible through the servicer,
                    # which streams one upload per device at a time): decide it after this batch commits.
                    deferred.append(item)
                    continue
                try:
                    duplicate = self._check(request, payload_sha256=item.received.sha256)
                except SyncError as exc:
                    item.finish(error=exc)
                    continue
                if duplicate is not None:
                    item.finish(ack=duplicate)
                    continue
                current = self._store.get_round(request.round_id)
                assert current is not None
                clip_norm = current.config.get("clip_norm")
                clip_scale = 1.0
                if clip_norm is not None and item.received.update_norm > float(clip_norm):
                    clip_scale = float(clip_norm) / item.received.update_norm
                devices.add(request.device_id)
                accepted.append(
                    (
                        item,
                        UploadRow(
                            upload_id=item.upload_id,
                            round_id=request.round_id,
                            device_id=request.device_id,
                            idempotency_key=request.idempotency_key,
                            base_version=request.base_version,
                            num_samples=request.num_samples,
                            encoding=request.encoding,
                            payload_sha256=item.received.sha256,
                            size=item.received.size,
                            path=item.relpath,
                            update_norm=item.received.update_norm,
                            clip_scale=clip_scale,
                            received_at=self._clock(),
                        ),
                    )
                )
            for round_id in sorted({row.round_id for _, row in accepted}):
                rows = [row for _, row in accepted if row.round_id == round_id]
                current = self._store.get_round(round_id)
                assert current is not None
                self._store.insert_uploads(rows, first_upload=current.state == "open")
                for _ in rows:
                    crash_point("upload.after_commit")
                counts[round_id] = self._store.count_uploads(round_id)
            for item, row in accepted:
                item.finish(
                    ack=UploadAck(
                        row.round_id,
                        row.upload_id,
                        False,
                        row.size,
                        counts[row.round_id],
                        row.update_norm,
                        row.clip_scale < 1.0,
                    )
                )
            self._advance_locked(update_metrics=False)  # may close the round early
        except BaseException as exc:
            for item in batch:
                item.finish(error=exc)  # no-op for items that already have their outcome
            deferred = []
        if deferred:
            with self._queue_lock:
                self._commit_queue[:0] = deferred
        for item in batch:
            if item.done and (item.error is not None or (item.ack is not None and item.ack.duplicate)):
                if not _committed(self._store, item.request, item.upload_id):
                    item.final_path.unlink(missing_ok=True)
        if self._metrics is not None and counts:
            self._metrics.round_uploads.set(counts[max(counts)])
        for item in batch:
            if item.ack is not None and not item.ack.duplicate:
                request, received = item.request, item.received
                log.info(
                    "upload accepted",
                    extra={
                        "fields": {
                            "round": request.round_id,
                            "device": request.device_id,
                            "bytes": received.size,
                            "encoding": request.encoding,
                            "norm": round(received.update_norm, 6),
                            "clipped": item.ack.clipped,
                            "round_uploads": item.ack.round_uploads,
                        }
                    },
                )

    def _check(self, request: UploadRequest, payload_sha256: str) -> UploadAck | None:
        """Idempotency and round-state checks (callers that commit hold the lock and advanced first)."""
        store = self._store
        existing = store.upload_by_key(request.device_id, request.idempotency_key)
        if existing is not None:
            if existing.round_id != request.round_id:
                raise SyncError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"idempotency key {request.idempotency_key!r} was already used for round "
                    f"{existing.round_id}; use a new key for a new round",
                    "key_reused",
                )
            if existing.payload_sha256 != payload_sha256:
                raise SyncError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"idempotency key {request.idempotency_key!r} was already used for a different "
                    f"payload in round {existing.round_id}; the first upload counts",
                    "key_reused",
                )
            if self._metrics is not None:
                self._metrics.upload_duplicates.inc()
            return UploadAck(
                existing.round_id,
                existing.upload_id,
                True,
                existing.size,
                store.count_uploads(existing.round_id),
                existing.update_norm,
                existing.clip_scale < 1.0,
            )
        target = store.get_round(request.round_id)
        if target is None or not target.accepting:
            current = store.current_round()
            now_round = f"the current round is {current.round_id}" if current else "no round is open"
        if target is None:
            raise precondition(
                f"round {request.round_id} does not exist; {now_round} (ask GetTask)", "wrong_round"
            )
        if not target.accepting:
            if target.state == "aggregating":
                detail = "its deadline passed and it is being aggregated"
            else:
                detail = f"it is {target.state}"
            raise precondition(
                f"late upload: round {request.round_id} no longer accepts uploads ({detail}); {now_round}",
                "late_upload",
            )
        if request.base_version != target.base_version:
            raise precondition(
                f"stale base version: round {request.round_id} starts from generalist version "
                f"{target.base_version}, the delta was computed against version {request.base_version}; "
                "download the current generalist",
                "stale_base",
            )
        prior = store.upload_for(request.round_id, request.device_id)
        if prior is not None:
            raise SyncError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"device {request.device_id!r} already uploaded to round {request.round_id} "
                f"(idempotency key {prior.idempotency_key!r}); a device counts once per round",
                "already_uploaded",
            )
        return None


class _PendingCommit:
    """One upload waiting in the group-commit queue; `finish` records its outcome exactly once."""

    def __init__(
        self, request: UploadRequest, received: ReceivedUpload, upload_id: str, relpath: str, final_path: Path
    ) -> None:
        self.request = request
        self.received = received
        self.upload_id = upload_id
        self.relpath = relpath
        self.final_path = final_path
        self.done = False
        self.ack: UploadAck | None = None
        self.error: BaseException | None = None

    def finish(self, *, ack: UploadAck | None = None, error: BaseException | None = None) -> None:
        if not self.done:
            self.ack, self.error, self.done = ack, error, True


def _committed(store: Store, request: UploadRequest, upload_id: str) -> bool:
    row = store.upload_for(request.round_id, request.device_id)
    return row is not None and row.upload_id == upload_id


class _Scaled(Mapping[str, np.ndarray]):
    """A lazily read upload multiplied by its norm-clipping factor (float64 when clipped)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], scale: float) -> None:
        self._tensors = tensors
        self._scale = scale

    def __getitem__(self, name: str) -> np.ndarray:
        value = self._tensors[name]
        return value if self._scale == 1.0 else value.astype(np.float64) * self._scale

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class _Sum(Mapping[str, np.ndarray]):
    """previous generalist + averaged delta, tensor by tensor, in float32."""

    def __init__(
        self,
        previous: Mapping[str, np.ndarray],
        delta: Mapping[str, np.ndarray],
        on_tensor: Callable[[int], None] | None = None,
    ) -> None:
        self._previous = previous
        self._delta = delta
        self._on_tensor = on_tensor
        self._done = 0

    def __getitem__(self, name: str) -> np.ndarray:
        value = (self._previous[name] + self._delta[name]).astype(np.float32)
        self._done += 1
        if self._on_tensor is not None:
            self._on_tensor(self._done)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._delta)

    def __len__(self) -> int:
        return len(self._delta)
