"""Receiving one upload: chunks in, validated payload file out.

The payload is written to a temp file as it arrives (its bytes *are* the stored file: no re-encoding).
Only the stream's shape (sizes) and the payload's JSON header (names, shapes, dtypes) are checked while
it streams, so a malformed upload is refused before its data is sent. The values (finite, norm) and the
SHA-256 are checked once the stream is complete, by reading the file back in `VERIFY_BLOCK_BYTES`
blocks from the page cache.

Why not check every 64 KiB chunk as it arrives: each chunk then cost about ten numpy and hashlib
calls that release the GIL, and with a dozen upload streams and gRPC's threads waiting for it every
release is a thread switch. Measured with the 200-device TLS burst on 2 cores (an ad-hoc probe,
benchmarks/RESULTS.md, session 14, admission off): switching value validation off took the
coordinator from ~45 to ~30 ms of CPU and from ~1,490 to ~840 context switches per upload, against
~4 ms for the same validation in a single thread. Blocks of 512 KiB need ~7x fewer such calls per
upload; at most `VERIFY_CONCURRENCY` uploads are verified at once, so the blocks add at most ~2 MiB.

Nothing here touches the database: committing is the round manager's job, under its lock.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from sync_service import encoding as enc
from sync_service.errors import invalid
from sync_service.manifest import Manifest
from sync_service.validation import DeltaValidator, UploadRequest, as_sync_error

#: Read-back block of the verification pass: large enough that an upload takes a dozen numpy calls,
#: small enough that a verification holds little memory (the block plus one temporary of its size).
VERIFY_BLOCK_BYTES = 512 * 1024
#: Uploads verified at once (the others wait their turn): bounds the blocks' memory. The work is CPU
#: bound, so more than the cores would only interleave it.
VERIFY_CONCURRENCY = 2
_verifying = threading.BoundedSemaphore(VERIFY_CONCURRENCY)


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
        self._file = open(self.temp_path, "w+b", buffering=0)  # noqa: SIM115 - closed in finish()/discard()
        self._validator = DeltaValidator(manifest, request.encoding, request.total_bytes)
        self._decoder = enc.PayloadDecoder(
            self._validator.on_header,
            self._validator.on_tensor,
            max_header_bytes=max_header_bytes,
            on_tensors=self._validator.on_tensors,
        )
        self._header_end = 0  # where the tensor data begins, once the header has been fed
        self.received = 0

    def feed(self, data: bytes) -> None:
        if self.received + len(data) > self.request.total_bytes:
            raise invalid(
                f"stream carries more than the {self.request.total_bytes} bytes its header declared",
                "oversize_stream",
            )
        if self._decoder.header is None:
            try:
                self._header_end += self._decoder.feed_header(data)
            except enc.PayloadError as exc:
                raise as_sync_error(exc) from None
        view = memoryview(data)
        while view:  # an unbuffered file may take part of a write
            view = view[self._file.write(view) :]
        self.received += len(data)

    def finish(self) -> ReceivedUpload:
        """Check completeness, values and checksum; make the temp file durable. Raises SyncError."""
        if self.received < self.request.total_bytes:
            raise invalid(
                f"truncated upload: the stream ended after {self.received} of "
                f"{self.request.total_bytes} bytes",
                "truncated",
            )
        with _verifying:
            digest = self._verify()
        if digest != self.request.payload_sha256:
            raise invalid(
                f"payload checksum mismatch: received bytes hash to {digest[:16]}..., the header says "
                f"{self.request.payload_sha256[:16]}...",
                "checksum",
            )
        norm = self._validator.finish()
        os.fsync(self._file.fileno())
        self._file.close()
        return ReceivedUpload(self.temp_path, self.received, digest, norm)

    def _verify(self) -> str:
        """Read the payload back once: hash every byte, decode and check every tensor after the header."""
        block = bytearray(VERIFY_BLOCK_BYTES)
        digest = hashlib.sha256()
        offset = 0
        try:
            while offset < self.received:
                n = os.preadv(self._file.fileno(), [block], offset)
                if n <= 0:
                    raise OSError(f"temp file {self.temp_path} ended at {offset} of {self.received} bytes")
                piece = memoryview(block)[:n]
                digest.update(piece)
                if offset + n > self._header_end:
                    self._decoder.feed(piece[max(self._header_end - offset, 0) :])
                offset += n
            self._decoder.close()
        except enc.PayloadError as exc:
            raise as_sync_error(exc) from None
        return digest.hexdigest()

    def discard(self) -> None:
        """Forget a rejected or abandoned upload (safe to call more than once, or after finish)."""
        if not self._file.closed:
            self._file.close()
        self.temp_path.unlink(missing_ok=True)
