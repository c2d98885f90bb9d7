"""Prometheus metrics of the coordinator.

Each server gets its own `CollectorRegistry` (not the process-global one) so tests and benchmarks can
run several servers in one process. Labels are bounded: reasons and encodings come from fixed lists,
never device names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from sync_service.admission import UploadSlots

_SIZE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class SyncMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds = Counter(
            "comigs_sync_rounds", "Rounds that finished, by outcome", ["outcome"], registry=r
        )
        self.round_extensions = Counter(
            "comigs_sync_round_extensions", "Deadline extensions for lack of quorum", registry=r
        )
        self.current_round = Gauge("comigs_sync_current_round", "Id of the newest round", registry=r)
        self.round_uploads = Gauge(
            "comigs_sync_round_uploads", "Uploads acknowledged in the current round", registry=r
        )
        self.generalist_version = Gauge(
            "comigs_sync_generalist_version", "Latest published generalist", registry=r
        )
        self.devices = Gauge("comigs_sync_devices", "Enrolled, non-revoked devices", registry=r)
        self.uploads = Counter(
            "comigs_sync_uploads", "Acknowledged uploads, by encoding", ["encoding"], registry=r
        )
        self.upload_duplicates = Counter(
            "comigs_sync_upload_duplicates",
            "Retried uploads answered from the idempotency record",
            registry=r,
        )
        self.upload_bytes = Counter(
            "comigs_sync_upload_bytes", "Payload bytes of acknowledged uploads", registry=r
        )
        self.download_bytes = Counter(
            "comigs_sync_download_bytes", "Generalist payload bytes sent", registry=r
        )
        self.rejects = Counter(
            "comigs_sync_rejects", "Refused requests, by gRPC code and reason", ["code", "reason"], registry=r
        )
        self.upload_seconds = Histogram(
            "comigs_sync_upload_seconds",
            "Time to receive, validate and commit an upload",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.aggregation_seconds = Histogram(
            "comigs_sync_aggregation_seconds",
            "Time to aggregate a round and publish its generalist",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.slot_requests = Counter(
            "comigs_sync_upload_slot_requests",
            "AcquireUploadSlot answers, by outcome (granted or queued)",
            ["outcome"],
            registry=r,
        )
        self.reports = Counter("comigs_sync_metric_reports", "ReportMetrics calls stored", registry=r)

    def watch_slots(self, slots: UploadSlots) -> None:
        """Expose upload admission (read at scrape time): streams served and devices queued."""
        for state, help_text in (
            ("streaming", "Upload streams being received"),
            ("granted", "Upload slots granted, stream not opened yet"),
            ("waiting", "Devices queued for an upload slot"),
        ):
            gauge = Gauge(f"comigs_sync_upload_slots_{state}", help_text, registry=self.registry)
            gauge.set_function(lambda state=state: slots.snapshot()[state])
