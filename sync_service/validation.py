"""Checks of an upload against the round manifest, while it streams in.

Nothing from a device is trusted: the upload header's fields, the payload's JSON header and every
tensor's values are checked before the upload is acknowledged. Errors are INVALID_ARGUMENT and name the
first offending tensor in sorted-name order, so a device developer can fix one thing at a time and the
message is the same on every retry. Round-state checks (round id, base version, deadline) are not here:
they depend on time and live with the rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sync_service import encoding as enc
from sync_service.auth import Authenticator
from sync_service.errors import SyncError, invalid
from sync_service.manifest import Manifest
from sync_service.proto import sync_pb2 as pb

ENCODING_NAMES = {pb.ENCODING_FP32: "fp32", pb.ENCODING_FP16: "fp16", pb.ENCODING_INT8: "int8"}
ENCODING_ENUMS = {name: value for value, name in ENCODING_NAMES.items()}
MAX_IDEMPOTENCY_KEY = 128
MAX_NUM_SAMPLES = 1 << 40


@dataclass(frozen=True)
class UploadRequest:
    """A checked upload header."""

    device_id: str
    round_id: int
    base_version: int
    num_samples: int
    encoding: str
    idempotency_key: str
    total_bytes: int
    payload_sha256: str


def max_upload_bytes(manifest: Manifest, max_header_bytes: int) -> int:
    """The largest payload worth receiving: an fp32 delta with the largest allowed header."""
    return 8 + max_header_bytes + manifest.nbytes


def check_upload_header(
    header: pb.UploadHeader,
    principal: str,
    manifest: Manifest,
    max_header_bytes: int,
    encodings: tuple[str, ...],
) -> UploadRequest:
    Authenticator.check_acting_as(principal, header.device_id, "UploadHeader.device_id")
    if header.round_id < 1:
        raise invalid("UploadHeader.round_id must be >= 1 (take it from GetTask)", "bad_header")
    if not 1 <= header.num_samples <= MAX_NUM_SAMPLES:
        raise invalid(f"UploadHeader.num_samples must be between 1 and {MAX_NUM_SAMPLES}", "bad_header")
    name = ENCODING_NAMES.get(header.encoding)
    if name is None:
        raise invalid(f"UploadHeader.encoding {header.encoding} is not one of FP32, FP16, INT8", "bad_header")
    if name not in encodings:
        raise invalid(
            f"encoding {name} is disabled on this coordinator (accepted: {', '.join(encodings)})",
            "bad_header",
        )
    key = header.idempotency_key
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not all(33 <= ord(c) <= 126 for c in key):
        raise invalid(
            f"UploadHeader.idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters "
            "without spaces (reuse it when retrying)",
            "bad_header",
        )
    limit = max_upload_bytes(manifest, max_header_bytes)
    if header.total_bytes < 16:
        raise invalid(
            f"UploadHeader.total_bytes {header.total_bytes} is too small for a payload", "bad_header"
        )
    if header.total_bytes > limit:
        raise invalid(
            f"UploadHeader.total_bytes {header.total_bytes} exceeds the limit of {limit} bytes "
            "for this manifest",
            "too_large",
        )
    if len(header.payload_sha256) != 32:
        raise invalid("UploadHeader.payload_sha256 must be the 32-byte SHA-256 of the payload", "bad_header")
    return UploadRequest(
        device_id=principal,
        round_id=header.round_id,
        base_version=header.base_version,
        num_samples=header.num_samples,
        encoding=name,
        idempotency_key=key,
        total_bytes=header.total_bytes,
        payload_sha256=header.payload_sha256.hex(),
    )


class DeltaValidator:
    """Validates a payload's header and tensors as `PayloadDecoder` produces them; computes the L2 norm.

    Plug `on_header` and `on_tensor` into a `PayloadDecoder`; call `finish()` after the decoder closed.
    Memory: one float64 copy of the current tensor plus per-row sums for int8 tensors awaiting scales.
    """

    def __init__(self, manifest: Manifest, encoding: str, declared_total: int) -> None:
        self._manifest = manifest
        self._encoding = encoding
        self._declared_total = declared_total
        self._wire_dtype = enc.ENCODING_DTYPE[encoding]
        self._sum_squares = 0.0
        self._pending_rows: dict[str, np.ndarray] = {}
        self._pending_scales: dict[str, np.ndarray] = {}
        self._entries: dict[str, enc.TensorEntry] = {}

    def on_header(self, header: enc.PayloadHeader) -> None:
        meta_encoding = header.metadata.get("encoding")
        if meta_encoding is not None and meta_encoding != self._encoding:
            raise invalid(
                f"payload metadata says encoding {meta_encoding!r} but the upload header says "
                f"{self._encoding!r}",
                "encoding_mismatch",
            )
        meta_format = header.metadata.get("format")
        if meta_format is not None and meta_format != enc.FORMAT:
            raise invalid(f"payload format {meta_format!r} is not {enc.FORMAT!r}", "bad_payload")
        if header.total_bytes != self._declared_total:
            raise invalid(
                f"UploadHeader.total_bytes is {self._declared_total} but the payload header describes "
                f"{header.total_bytes} bytes",
                "size_mismatch",
            )
        entries = header.by_name()
        self._entries = entries
        expected = set(self._manifest)
        if self._encoding == "int8":
            expected |= {enc.scale_name(name) for name in self._manifest}
        for name in sorted(expected | set(entries)):
            self._check_entry(name, entries.get(name), name in expected)

    def _check_entry(self, name: str, entry: enc.TensorEntry | None, expected: bool) -> None:
        if entry is None:
            raise invalid(f"missing tensor {name!r}: the round manifest requires it", "missing_tensor")
        if not expected:
            if enc.is_scale_name(name) and name[: -len(enc.SCALE_SUFFIX)] in self._manifest:
                raise invalid(
                    f"tensor {name!r}: scale tensors belong only to int8 payloads, this one is "
                    f"{self._encoding}",
                    "unknown_tensor",
                )
            raise invalid(
                f"unknown tensor {name!r}: not in the round manifest (only generalist tensors are exchanged)",
                "unknown_tensor",
            )
        if enc.is_scale_name(name):
            value_shape = self._manifest[name[: -len(enc.SCALE_SUFFIX)]].shape
            if entry.dtype != "F32" or entry.shape not in ((), value_shape[:-1]):
                raise invalid(
                    f"scale tensor {name!r} must be F32 with shape [] (per tensor) or "
                    f"{list(value_shape[:-1])} "
                    f"(per row), got {entry.dtype}{list(entry.shape)}",
                    "bad_dtype" if entry.dtype != "F32" else "bad_shape",
                )
            return
        spec = self._manifest[name]
        if entry.dtype != self._wire_dtype:
            raise invalid(
                f"tensor {name!r} has dtype {entry.dtype}, but encoding {self._encoding} requires "
                f"{self._wire_dtype}",
                "bad_dtype",
            )
        if entry.shape != spec.shape:
            raise invalid(
                f"tensor {name!r} has shape {list(entry.shape)}, the round manifest says {list(spec.shape)}",
                "bad_shape",
            )

    def on_tensor(self, entry: enc.TensorEntry, raw: memoryview) -> None:
        values = enc.array_from_bytes(entry, raw)
        if enc.is_scale_name(entry.name):
            if not np.all(np.isfinite(values)):
                raise invalid(f"scale tensor {entry.name!r} contains {_first_bad(values)}", "non_finite")
            if np.any(values < 0):
                index = [int(i) for i in np.argwhere(values < 0)[0]]
                raise invalid(f"scale tensor {entry.name!r} is negative at index {index}", "bad_scale")
            value_name = entry.name[: -len(enc.SCALE_SUFFIX)]
            self._pending_scales[value_name] = values.astype(np.float64)
            self._combine_int8(value_name)
            return
        if entry.dtype == "I8":
            rows = values.astype(np.int64)
            if self._entries[enc.scale_name(entry.name)].shape == ():
                squares = np.asarray(float(np.sum(rows * rows)))
            else:
                squares = np.sum(rows * rows, axis=-1).astype(np.float64)
            self._pending_rows[entry.name] = squares
            self._combine_int8(entry.name)
            return
        self._add_float_sums([entry], values.reshape(-1), raw)

    def on_tensors(self, entries: Sequence[enc.TensorEntry], raw: memoryview) -> None:
        """Several whole tensors, back to back in `raw` (see `PayloadDecoder`): fp32/fp16 in a few calls."""
        if self._wire_dtype == "I8":
            offset = 0
            for entry in entries:
                self.on_tensor(entry, raw[offset : offset + entry.nbytes])
                offset += entry.nbytes
            return
        # on_header admitted only value tensors of the wire dtype, so the run is one flat array.
        self._add_float_sums(entries, np.frombuffer(raw, dtype=enc.SAFETENSORS_DTYPES[self._wire_dtype]), raw)

    def _add_float_sums(self, entries: Sequence[enc.TensorEntry], values: np.ndarray, raw: memoryview) -> None:
        # Elementwise numpy, not np.dot: BLAS calls from many server threads contend badly (OpenBLAS spins;
        # measured: 300x slower ingest). Squares in the wire dtype (a square that overflows is reported as
        # too large, no sane delta comes near), then one sum per tensor (`np.add.reduceat`, pairwise within
        # each tensor, in float32: a float64 copy of the squares made this 3x slower, and it was a third of
        # the coordinator's CPU per upload), added to a float64 total tensor by tensor in data order:
        # whether tensors arrive one by one or in runs (which depends on the client's chunking), every sum
        # and so the norm, and the clipping factor, are bit-identical.
        if values.dtype == np.float16:
            values = values.astype(np.float32)  # float16 squares overflow above 256
        starts, position = [], 0
        for entry in entries:
            count = math.prod(entry.shape)
            if count:
                starts.append(position)
            position += count
        if not starts:
            return
        with np.errstate(over="ignore", invalid="ignore"):
            sums = np.add.reduceat(np.square(values), starts)
            if not np.isfinite(sums).all():  # name the first offending tensor (rare, so per tensor)
                offset = 0
                for entry in entries:
                    tensor = self._float_values(entry, raw, offset)
                    if not np.all(np.isfinite(np.square(tensor))):
                        self._raise_non_finite(entry, tensor)
                    offset += entry.nbytes
                # Every square is finite, only some float32 sums overflowed: those tensors (and only
                # those, so the result does not depend on which tensors shared the run) sum in float64.
                sums = np.where(np.isfinite(sums), sums, np.add.reduceat(np.square(values).astype(np.float64), starts))
        for total in sums.tolist():
            self._sum_squares += total

    @staticmethod
    def _float_values(entry: enc.TensorEntry, raw: memoryview, offset: int) -> np.ndarray:
        values = enc.array_from_bytes(entry, raw[offset : offset + entry.nbytes])
        return values.astype(np.float32) if values.dtype == np.float16 else values

    @staticmethod
    def _raise_non_finite(entry: enc.TensorEntry, values: np.ndarray) -> None:
        if not np.all(np.isfinite(values)):
            raise invalid(f"tensor {entry.name!r} contains {_first_bad(values)}", "non_finite")
        raise invalid(f"tensor {entry.name!r} has values too large to average", "non_finite")

    def _combine_int8(self, name: str) -> None:
        if name in self._pending_rows and name in self._pending_scales:
            squares = self._pending_rows.pop(name)
            scales = self._pending_scales.pop(name)
            self._sum_squares += float(np.sum(squares * scales * scales))

    def finish(self) -> float:
        """The L2 norm of the decoded delta (after all tensors were seen)."""
        if self._pending_rows or self._pending_scales:  # impossible once the decoder closed cleanly
            raise invalid("payload ended before every int8 tensor had its scale", "bad_payload")
        return math.sqrt(self._sum_squares)


def _first_bad(values: np.ndarray) -> str:
    bad = ~np.isfinite(values)
    index = [int(i) for i in np.argwhere(bad)[0]] if values.ndim else []
    value = values[tuple(index)] if values.ndim else values
    kind = "NaN" if np.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    return f"{kind} at index {index}"


def as_sync_error(exc: enc.PayloadError) -> SyncError:
    return invalid(f"malformed payload: {exc}", "bad_payload")
