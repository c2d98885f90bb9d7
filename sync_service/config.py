"""Coordinator configuration: how rounds run and how the server listens.

Round settings are snapshotted into each round's database row when it opens, so restarting the server
with different flags never changes a round that is already collecting (and a crash-restart re-aggregates
with exactly the settings the round started with).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sync_service.aggregation import DEFAULT_STRATEGY, STRATEGIES
from sync_service.encoding import DEFAULT_MAX_HEADER_BYTES, ENCODINGS


@dataclass(frozen=True)
class LocalTrainingConfig:
    """What devices do between download and upload; 0 means "the device's own default"."""

    local_steps: int = 10
    router_every: int = 0
    router_steps: int = 0
    expert_lr: float = 0.0
    router_lr: float = 0.0
    batch_size: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("local_steps", "router_every", "router_steps", "batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("expert_lr", "router_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0")


@dataclass(frozen=True)
class RoundConfig:
    """How a round opens, waits and closes.

    A round accepts uploads until `round_timeout_s` after it opened. At the deadline it aggregates if
    `min_devices` uploads arrived; otherwise it is extended by `extension_s` up to `max_extensions`
    times, then fails with a recorded reason (and the next round opens). With `early_close`, a round
    also closes as soon as every enrolled, non-revoked device has uploaded.
    """

    min_devices: int = 2
    round_timeout_s: float = 600.0
    extension_s: float | None = None
    max_extensions: int = 2
    rounds: int = 20
    strategy: str = DEFAULT_STRATEGY
    clip_norm: float | None = None
    early_close: bool = True
    encodings: tuple[str, ...] = ENCODINGS
    poll_interval_s: float = 5.0
    local: LocalTrainingConfig = field(default_factory=LocalTrainingConfig)

    def __post_init__(self) -> None:
        if self.min_devices < 1:
            raise ValueError("min_devices must be >= 1")
        if not (self.round_timeout_s > 0 and math.isfinite(self.round_timeout_s)):
            raise ValueError("round_timeout_s must be a positive number of seconds")
        if self.extension_s is not None and not (self.extension_s > 0 and math.isfinite(self.extension_s)):
            raise ValueError("extension_s must be a positive number of seconds")
        if self.max_extensions < 0:
            raise ValueError("max_extensions must be >= 0")
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0 (0 = unlimited)")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}")
        if self.clip_norm is not None and not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError("clip_norm must be a positive number")
        if not self.encodings or set(self.encodings) - set(ENCODINGS):
            raise ValueError(f"encodings must be a non-empty subset of {ENCODINGS}")
        if not self.poll_interval_s > 0:
            raise ValueError("poll_interval_s must be > 0")

    @property
    def extension(self) -> float:
        return self.extension_s if self.extension_s is not None else self.round_timeout_s

    def snapshot(self) -> dict[str, Any]:
        """The per-round copy stored with the round (JSON-serialisable)."""
        data = asdict(self)
        data["extension_s"] = self.extension
        data["encodings"] = list(self.encodings)
        del data["rounds"]
        return data


@dataclass(frozen=True)
class ServerConfig:
    """Everything `comigs sync serve` needs."""

    state_dir: Path
    listen: str = "0.0.0.0:50051"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    #: host:port of the Prometheus endpoint; None disables it; port 0 picks a free one.
    metrics_listen: str | None = "127.0.0.1:9464"
    max_workers: int = 16
    #: Upload streams served at once (see sync_service/admission.py); None: max_workers - 4 (at least 1),
    #: leaving handler threads for the short calls; 0 disables admission (every stream is served).
    upload_slots: int | None = None
    #: A connection without any call for this long is closed (devices reconnect on their next call), so
    #: devices busy training or waiting for their turn do not hold TLS state in the coordinator.
    idle_connection_s: float = 120.0
    #: TCP connections held at once; gRPC closes any beyond this right after accepting it (before TLS),
    #: and devices retry after their backoff. Bounds the memory a burst of devices costs: each TLS
    #: connection holds ~65-200 KiB in gRPC (sync_service/README.md, "Connections"). 0: no limit;
    #: None: 64, or 4 x the upload slots if that is more.
    max_connections: int | None = None
    #: gRPC messages above this are refused by gRPC itself (RESOURCE_EXHAUSTED).
    max_message_bytes: int = 4 * 1024 * 1024 + 64 * 1024
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    download_chunk_bytes: int = 1024 * 1024
    keep_uploads: bool = False
    ready_file: Path | None = None
    tick_interval_s: float = 0.2
    grace_s: float = 5.0
    rounds: RoundConfig = field(default_factory=RoundConfig)

    def __post_init__(self) -> None:
        if self.insecure and (self.tls_cert or self.tls_key):
            raise ValueError("--insecure and --tls-cert/--tls-key are mutually exclusive")
        if not self.insecure and not (self.tls_cert and self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key (or --insecure on a loopback address)")
        if self.max_workers < 2:
            raise ValueError("max_workers must be >= 2")
        if self.upload_slots is not None and self.upload_slots < 0:
            raise ValueError("upload_slots must be >= 0 (0: no admission control)")
        if self.max_connections is not None and self.max_connections < 0:
            raise ValueError("max_connections must be >= 0 (0: no limit)")
        if 0 < self.connection_limit <= self.slots:
            raise ValueError(
                f"max_connections ({self.connection_limit}) must exceed the upload slots ({self.slots}): "
                "devices need connections to queue for a slot and to stream"
            )
        if not (self.idle_connection_s > 0 and math.isfinite(self.idle_connection_s)):
            raise ValueError("idle_connection_s must be a positive number of seconds")
        if not 64 * 1024 <= self.download_chunk_bytes <= self.max_message_bytes - 1024:
            raise ValueError("download_chunk_bytes must be between 64 KiB and the message size limit")

    @property
    def slots(self) -> int:
        """Upload slots in force (0: admission control off)."""
        if self.upload_slots is not None:
            return self.upload_slots
        return max(1, self.max_workers - 4)

    @property
    def connection_limit(self) -> int:
        """Connections held at once (0: no limit)."""
        if self.max_connections is not None:
            return self.max_connections
        return max(64, 4 * self.slots)
