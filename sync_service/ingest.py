"""Receiving one upload: chunks in, validated payload file out.

The payload is written to a temp file as it arrives (its bytes *are* the stored file: no re-encoding),
hashed, and parsed incrementally so that every tensor is validated the moment it is complete. Memory per
upload is one gRPC message plus one tensor, which is what lets one server take hundreds of concurrent
uploads with a peak RSS of a few deltas. Nothing here touches the database: committing is the round
manager's job, under its lock.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from sync_service import encoding as enc
from sync_service.errors import invalid
from sync_service.manifest import Manifest
from sync_service.validation import DeltaValidator, UploadRequest, as_sync_error


@dataclass(frozen=True)
class ReceivedUpload:
    """A complete, validated payload sitting fsynced in a temp file."""

    temp_path: Path
    size: int
    sha256: str
    update_norm: float


class UploadReceiver:
    def __init__(
        self, tmp_dir: Path, request: UploadRequest, manifest: Manifest, max_header_bytes: int
    ) -> None:
        self.request = request
        self.temp_path = tmp_dir / f"{uuid.uuid4().hex}.part"
        self._file = open(self.temp_path, "wb")  # noqa: SIM115 - closed in finish()/discard()
        self._hash = hashlib.sha256()
        self._validator = DeltaValidator(manifest, request.encoding, request.total_bytes)
        self._decoder = enc.PayloadDecoder(
            self._validator.on_header,
            self._validator.on_tensor,
            max_header_bytes=max_header_bytes,
            on_tensors=self._validator.on_tensors,
        )
        self.received = 0

    def feed(self, data: bytes) -> None:
        if self.received + len(data) > self.request.total_bytes:
            raise invalid(
                f"stream carries more than the {self.request.total_bytes} bytes its header declared",
                "oversize_stream",
            )
        try:
            self._decoder.feed(data)
        except enc.PayloadError as exc:
            raise as_sync_error(exc) from None
        self._hash.update(data)
        self._file.write(data)
        self.received += len(data)

    def finish(self) -> ReceivedUpload:
        """Check completeness and checksum, make the temp file durable. Raises SyncError."""
        if self.received < self.request.total_bytes:
            raise invalid(
                f"truncated upload: the stream ended after {self.received} of "
                f"{self.request.total_bytes} bytes",
                "truncated",
            )
        try:
            self._decoder.close()
        except enc.PayloadError as exc:
            raise as_sync_error(exc) from None
        norm = self._validator.finish()
        digest = self._hash.hexdigest()
        if digest != self.request.payload_sha256:
            raise invalid(
                f"payload checksum mismatch: received bytes hash to {digest[:16]}..., the header says "
                f"{self.request.payload_sha256[:16]}...",
                "checksum",
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return ReceivedUpload(self.temp_path, self.received, digest, norm)

    def discard(self) -> None:
        """Forget a rejected or abandoned upload (safe to call more than once, or after finish)."""
        if not self._file.closed:
            self._file.close()
        self.temp_path.unlink(missing_ok=True)
