"""The "comigs tensor payload" format: how named tensors travel and rest, shared by server and client.

A payload is a plain safetensors file, chosen because every ecosystem can already read it and because it
is simple enough for the Android client to write by hand:

    bytes [0, 8)        N: the JSON header length, uint64 little-endian
    bytes [8, 8+N)      the JSON header (UTF-8), optionally right-padded with spaces
    bytes [8+N, end)    the data region: every tensor's bytes, little-endian, row-major

The header maps each tensor name to ``{"dtype": D, "shape": [...], "data_offsets": [begin, end]}``
(offsets relative to the data region) plus an optional ``"__metadata__"`` object of strings. Our writer
is canonical (sorted keys, no spaces, ASCII, padded so the data starts at a multiple of 8, data laid out
in sorted-name order), so the same tensors always give the same bytes; our reader accepts any valid
safetensors layout whose tensors tile the data region exactly.

Encodings of a delta, declared in the upload header and in ``__metadata__["encoding"]``:

* ``fp32``: every tensor ``F32``;
* ``fp16``: every tensor ``F16`` (values must fit float16);
* ``int8``: every tensor ``I8`` plus a ``F32`` tensor ``"<name>:scale"``, symmetric, no zero point.
  Scale shape ``[]`` means one scale for the tensor, shape ``shape[:-1]`` one scale per row (last axis).
  ``scale = float32(max|x|) / 127`` (float32 arithmetic), ``q = clip(rint(x / scale), -127, 127)``
  (round half to even), and ``x' = float32(q) * scale``; an all-zero tensor or row has scale 0.

The decoder is incremental (`PayloadDecoder`): fed any slicing of the bytes, it never holds more than
one tensor; the server checks an upload's header as it streams in and its values in large blocks once
it is complete.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

FORMAT = "comigs-tensors/1"
ENCODINGS = ("fp32", "fp16", "int8")
INT8_GRANULARITIES = ("auto", "tensor", "row")
SCALE_SUFFIX = ":scale"
#: Headers above this are refused before any JSON is parsed (a 200-tensor delta needs ~30 KiB).
DEFAULT_MAX_HEADER_BYTES = 1 << 20
#: "auto" int8 granularity uses per-row scales when rows have at least this many elements, so scales
#: cost at most 4/64 of the int8 bytes (int8 payloads stay under 0.27x fp32).
AUTO_ROW_MIN_LENGTH = 64
_MAX_TENSORS = 100_000

#: safetensors dtype -> little-endian numpy dtype (BF16 is read as raw uint16 and widened by hand).
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}
#: Wire dtype of the value tensors of each encoding.
ENCODING_DTYPE = {"fp32": "F32", "fp16": "F16", "int8": "I8"}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class PayloadError(ValueError):
    """A payload that is not valid; `tensor` names the offending tensor where there is one."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


@dataclass(frozen=True)
class TensorEntry:
    """One header entry: where a tensor's bytes lie in the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class PayloadHeader:
    """A parsed, structurally valid header. `entries` are in data (offset) order."""

    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    header_length: int
    data_length: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_length

    @property
    def total_bytes(self) -> int:
        return self.data_start + self.data_length

    def by_name(self) -> dict[str, TensorEntry]:
        return {entry.name: entry for entry in self.entries}


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def is_scale_name(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def int8_scale_shape(shape: tuple[int, ...], granularity: str) -> tuple[int, ...]:
    """The scale tensor's shape for a value tensor of `shape` ("auto" is resolved from the shape alone)."""
    if granularity not in INT8_GRANULARITIES:
        raise ValueError(f"int8 granularity must be one of {INT8_GRANULARITIES}, got {granularity!r}")
    if granularity == "auto":
        granularity = "row" if len(shape) >= 2 and shape[-1] >= AUTO_ROW_MIN_LENGTH else "tensor"
    return tuple(shape[:-1]) if granularity == "row" and len(shape) >= 1 else ()


# ----------------------------------------------------------------------------------------------- header


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise PayloadError(f"payload header names tensor {key!r} twice", tensor=key)
        result[key] = value
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(header_bytes: bytes, data_length: int | None = None) -> PayloadHeader:
    """Parse and structurally check a JSON header (without the 8-byte length prefix).

    Checks types, known dtypes, that each tensor's byte range matches its shape and that the ranges tile
    the data region without gaps or overlaps. `data_length`, if known, must equal the tiled size.
    Manifest checks (names, shapes, encodings) are the caller's business.
    """
    try:
        text = bytes(header_bytes).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"payload header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        raw = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except PayloadError:
        raise
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"payload header is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PayloadError(f"payload header must be a JSON object, got {type(raw).__name__}")
    metadata: dict[str, str] = {}
    if "__metadata__" in raw:
        meta = raw.pop("__metadata__")
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise PayloadError("payload header __metadata__ must be an object of strings")
        metadata = dict(meta)
    if len(raw) > _MAX_TENSORS:
        raise PayloadError(f"payload header lists {len(raw)} tensors (limit {_MAX_TENSORS})")
    entries = []
    for name in sorted(raw):
        info = raw[name]
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise PayloadError(
                f"tensor {name!r}: header entry must have exactly dtype, shape and data_offsets", tensor=name
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise PayloadError(f"tensor {name!r}: unknown dtype {dtype!r}", tensor=name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape) or len(shape) > 16:
            raise PayloadError(f"tensor {name!r}: shape must be a list of at most 16 sizes >= 0", tensor=name)
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
        ):
            raise PayloadError(f"tensor {name!r}: data_offsets must be [begin, end]", tensor=name)
        begin, end = offsets
        expected = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if end - begin != expected:
            raise PayloadError(
                f"tensor {name!r}: data_offsets span {end - begin} bytes but {dtype}{shape} needs {expected}",
                tensor=name,
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))
    entries.sort(key=lambda e: (e.begin, e.end, e.name))
    position = 0
    for entry in entries:
        if entry.begin != position:
            kind = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            raise PayloadError(
                f"tensor {entry.name!r}: data_offsets {kind} (at byte {position})", tensor=entry.name
            )
        position = entry.end
    if data_length is not None and position != data_length:
        raise PayloadError(f"payload data region is {data_length} bytes but the header describes {position}")
    return PayloadHeader(tuple(entries), metadata, len(header_bytes), position)


def build_header(
    specs: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> bytes:
    """The canonical 8-byte length + padded JSON header for tensors laid out in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text


# ------------------------------------------------------------------------------------------- codecs


def quantize_int8(x: np.ndarray, granularity: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantisation; returns (q int8 with x's shape, float32 scales)."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise PayloadError("cannot quantise non-finite values to int8")
    scale_shape = int8_scale_shape(tuple(x.shape), granularity)
    if scale_shape == () or x.ndim == 0:
        amax = np.float32(np.max(np.abs(x))) if x.size else np.float32(0)
        scale = np.float32(amax / np.float32(127))
        divisor = scale if scale > 0 else np.float32(1)
        q = np.clip(np.rint(x / divisor), -127, 127).astype(np.int8)
        return q, np.asarray(scale, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1])
    amax = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(rows.shape[0], np.float32)
    scale = (amax.astype(np.float32) / np.float32(127)).astype(np.float32)
    divisor = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(rows / divisor[:, None]), -127, 127).astype(np.int8)
    return q.reshape(x.shape), scale.reshape(scale_shape)


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32(q) * scale, in float32, with one scale per tensor (shape ()) or per row (shape[:-1])."""
    scale = np.asarray(scale, dtype=np.float32)
    values = q.astype(np.float32)
    if scale.ndim == 0:
        return values * scale
    return values * scale[..., None]


def array_from_bytes(entry: TensorEntry, raw: bytes | memoryview) -> np.ndarray:
    """The tensor's values in its wire dtype (BF16 widened to float32). May share memory with `raw`."""
    array = np.frombuffer(raw, dtype=SAFETENSORS_DTYPES[entry.dtype])
    if entry.dtype == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.reshape(entry.shape)


def to_float32(entry: TensorEntry, raw: bytes | memoryview, scale: np.ndarray | None = None) -> np.ndarray:
    """Decode one value tensor to a fresh float32 array (dequantising int8 with its scale)."""
    array = array_from_bytes(entry, raw)
    if entry.dtype == "I8":
        if scale is None:
            raise PayloadError(
                f"tensor {entry.name!r} is int8 but has no {scale_name(entry.name)!r}", entry.name
            )
        return dequantize_int8(array, scale)
    if entry.dtype not in _FLOAT_DTYPES:
        raise PayloadError(
            f"tensor {entry.name!r}: dtype {entry.dtype} is not a floating-point type", entry.name
        )
    return np.array(array, dtype=np.float32, copy=True)


def _wire_specs(
    shapes: Mapping[str, tuple[int, ...]], encoding: str, int8_granularity: str
) -> list[tuple[str, str, tuple[int, ...]]]:
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    for name in sorted(shapes):
        if is_scale_name(name):
            raise PayloadError(f"tensor name {name!r} may not end in {SCALE_SUFFIX!r}", name)
        shape = tuple(int(d) for d in shapes[name])
        specs.append((name, ENCODING_DTYPE[encoding], shape))
        if encoding == "int8":
            specs.append((scale_name(name), "F32", int8_scale_shape(shape, int8_granularity)))
    specs.sort(key=lambda spec: spec[0])
    return specs


def encode_iter(
    tensors: Mapping[str, np.ndarray],
    encoding: str = "fp32",
    *,
    int8_granularity: str = "auto",
    metadata: Mapping[str, str] | None = None,
) -> Iterator[bytes]:
    """Yield the canonical payload piece by piece (header, then each tensor) so writers can stream it.

    `tensors` may be a lazy mapping: each value is read once, when its bytes are due.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    specs = _wire_specs(
        {name: np.shape(value) for name, value in tensors.items()}, encoding, int8_granularity
    )
    meta = {"format": FORMAT, "encoding": encoding, **(metadata or {})}
    yield build_header(specs, meta)
    pending_scale: dict[str, np.ndarray] = {}
    for name, _dtype, shape in specs:
        if is_scale_name(name):
            yield pending_scale.pop(name).astype("<f4").tobytes()
            continue
        value = np.asarray(tensors[name])
        if tuple(value.shape) != shape:
            raise PayloadError(f"tensor {name!r} changed shape while encoding", name)
        if encoding == "fp32":
            yield np.ascontiguousarray(value, dtype="<f4").tobytes()
        elif encoding == "fp16":
            value32 = np.asarray(value, dtype=np.float32)
            if value32.size and float(np.max(np.abs(value32))) > float(np.finfo(np.float16).max):
                raise PayloadError(f"tensor {name!r} has values beyond the float16 range; send fp32", name)
            yield np.ascontiguousarray(value32, dtype="<f2").tobytes()
        else:
            try:
                q, scale = quantize_int8(value, int8_granularity)
            except PayloadError as exc:
                raise PayloadError(f"tensor {name!r}: {exc}", name) from None
            pending_scale[scale_name(name)] = scale
            yield q.tobytes()


def encode(
    tensors: Mapping[str, np.ndarray],
    encoding: str = "fp32",
    *,
    int8_granularity: str = "auto",
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Encode named float tensors as one canonical payload (see the module docstring)."""
    return b"".join(encode_iter(tensors, encoding, int8_granularity=int8_granularity, metadata=metadata))


def encoded_size(shapes: Mapping[str, tuple[int, ...]], encoding: str, int8_granularity: str = "auto") -> int:
    """Exact payload size for tensors of these shapes, without encoding anything."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    specs = _wire_specs(shapes, encoding, int8_granularity)
    header = build_header(specs, {"format": FORMAT, "encoding": encoding})
    return len(header) + sum(math.prod(s) * np.dtype(SAFETENSORS_DTYPES[d]).itemsize for _, d, s in specs)


# ------------------------------------------------------------------------------------------- decoding


class PayloadDecoder:
    """Incremental payload parser: feed it bytes in any slicing; it calls back per complete tensor.

    `on_header(header)` runs once the JSON header is parsed (before any tensor data), `on_tensor(entry,
    raw)` for every tensor in data order; `raw` is only valid during the call. Memory use is one tensor
    (plus the header), whatever the payload size. Errors raise `PayloadError`.

    With `on_tensors(entries, raw)`, whole tensors that lie inside one fed piece are handed over together
    (consecutive entries, `raw` their bytes back to back, zero-copy), so a consumer can check many small
    tensors with a few vectorised calls; tensors split across pieces still go to `on_tensor` one by one.
    """

    def __init__(
        self,
        on_header: Callable[[PayloadHeader], None] | None = None,
        on_tensor: Callable[[TensorEntry, memoryview], None] | None = None,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        on_tensors: Callable[[Sequence[TensorEntry], memoryview], None] | None = None,
    ) -> None:
        self._on_header = on_header
        self._on_tensor = on_tensor
        self._on_tensors = on_tensors
        self._max_header_bytes = max_header_bytes
        self._buffer = bytearray()
        self._stage = "length"
        self._need = 8
        self._next = 0
        self.header: PayloadHeader | None = None
        self.received = 0

    @property
    def complete(self) -> bool:
        return self._stage == "done"

    def feed_header(self, data: bytes | memoryview) -> int:
        """Feed only the bytes the JSON header still needs (checking it); return how many were used.

        Lets a receiver check the header as soon as the first bytes arrive and `feed` the tensor data
        later, in pieces of its choosing (the coordinator validates values in large blocks once an upload
        is complete: see sync_service/ingest.py).
        """
        view = memoryview(data).cast("B")
        used = 0
        while self._stage in ("length", "header") and used < len(view):
            take = min(self._need - len(self._buffer), len(view) - used)
            self.feed(view[used : used + take])
            used += take
        return used

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        position = 0
        while True:
            if self._stage == "data" and self._need == 0:
                self._complete(memoryview(b""))
                continue
            if position >= len(view):
                break
            if self._stage == "done":
                extra = len(view) - position
                raise PayloadError(f"payload has {extra} bytes after the last tensor its header describes")
            if self._stage == "data" and self._on_tensors is not None and not self._buffer:
                position = self._complete_run(view, position)
                if self._stage == "done" or position >= len(view):
                    continue
            take = min(self._need - len(self._buffer), len(view) - position)
            if not self._buffer and take == self._need:
                segment = view[position : position + take]
                position += take
                self.received += take
                self._complete(segment)
                continue
            self._buffer += view[position : position + take]
            position += take
            self.received += take
            if len(self._buffer) == self._need:
                segment = memoryview(bytes(self._buffer))
                self._buffer.clear()
                self._complete(segment)

    def _complete_run(self, view: memoryview, position: int) -> int:
        """Hand every whole tensor starting at `position` to `on_tensors` at once; return the new position."""
        assert self.header is not None and self._on_tensors is not None
        entries = self.header.entries
        first, end = self._next, position
        while self._next < len(entries) and entries[self._next].nbytes <= len(view) - end:
            end += entries[self._next].nbytes
            self._next += 1
        if self._next > first:
            self.received += end - position
            self._on_tensors(entries[first : self._next], view[position:end])
            self._advance_entry()
        return end

    def close(self) -> PayloadHeader:
        """Check that the payload ended exactly where its header says; return the header."""
        if self._stage != "done" or self.header is None:
            if self.header is None:
                raise PayloadError(f"payload ended after {self.received} bytes, inside its header")
            raise PayloadError(
                f"payload truncated: {self.received} of {self.header.total_bytes} bytes "
                f"(missing tensor {self.header.entries[self._next].name!r})",
                tensor=self.header.entries[self._next].name,
            )
        return self.header

    def _complete(self, segment: memoryview) -> None:
        if self._stage == "length":
            length = int.from_bytes(segment, "little")
            if length > self._max_header_bytes:
                raise PayloadError(f"payload header is {length} bytes (limit {self._max_header_bytes})")
            if length < 2:
                raise PayloadError(f"payload header length {length} is too small to be a JSON object")
            self._stage, self._need = "header", length
        elif self._stage == "header":
            self.header = parse_header(segment)
            if self._on_header is not None:
                self._on_header(self.header)
            self._stage = "data"
            self._advance_entry()
        else:
            assert self.header is not None
            entry = self.header.entries[self._next]
            if self._on_tensor is not None:
                self._on_tensor(entry, segment)
            self._next += 1
            self._advance_entry()

    def _advance_entry(self) -> None:
        assert self.header is not None
        if self._next >= len(self.header.entries):
            self._stage, self._need = "done", 0
        else:
            self._need = self.header.entries[self._next].nbytes


def decode(
    payload: bytes | memoryview, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> dict[str, np.ndarray]:
    """Decode a whole payload to {name: float32 array}, dequantising int8 values with their scales."""
    raw: dict[str, tuple[TensorEntry, np.ndarray]] = {}

    def keep(entry: TensorEntry, data: memoryview) -> None:
        raw[entry.name] = (entry, np.array(array_from_bytes(entry, data), copy=True))

    decoder = PayloadDecoder(on_tensor=keep, max_header_bytes=max_header_bytes)
    decoder.feed(payload)
    decoder.close()
    return _finish_decode(raw)


def _finish_decode(raw: dict[str, tuple[TensorEntry, np.ndarray]]) -> dict[str, np.ndarray]:
    result: dict[str, np.ndarray] = {}
    for name in sorted(raw):
        if is_scale_name(name):
            if name[: -len(SCALE_SUFFIX)] not in raw:
                raise PayloadError(f"scale tensor {name!r} has no value tensor", tensor=name)
            continue
        entry, values = raw[name]
        if entry.dtype == "I8":
            scale_entry = raw.get(scale_name(name))
            if scale_entry is None:
                raise PayloadError(f"tensor {name!r} is int8 but has no {scale_name(name)!r}", tensor=name)
            check_scale(entry, scale_entry[0], scale_entry[1])
            result[name] = dequantize_int8(values, scale_entry[1])
        elif entry.dtype in _FLOAT_DTYPES:
            result[name] = values.astype(np.float32)
        else:
            raise PayloadError(
                f"tensor {name!r}: dtype {entry.dtype} is not a floating-point type", tensor=name
            )
    return result


def check_scale(value: TensorEntry, scale: TensorEntry, scale_values: np.ndarray) -> None:
    """An int8 scale tensor must be F32, per tensor or per row, finite and >= 0."""
    allowed = {(), tuple(value.shape[:-1])}
    if scale.dtype != "F32" or tuple(scale.shape) not in allowed:
        raise PayloadError(
            f"scale tensor {scale.name!r} must be F32 with shape [] or {list(value.shape[:-1])}, "
            f"got {scale.dtype}{list(scale.shape)}",
            tensor=scale.name,
        )
    if not np.all(np.isfinite(scale_values)) or np.any(scale_values < 0):
        raise PayloadError(
            f"scale tensor {scale.name!r} has a negative or non-finite scale", tensor=scale.name
        )


class _PayloadReader(Mapping[str, np.ndarray]):
    """What the two lazy payload readers share: a list of tensor names and a file descriptor (-1: none
    held) that `close()`, the `with` block or garbage collection releases."""

    _fd: int = -1
    _names: list[str]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class TensorFile(_PayloadReader):
    """Lazy read access to a payload file: each tensor is read (and dequantised) when it is asked for.

    Aggregation streams uploads through this, so it holds one tensor at a time, not one upload.
    Keys are the value tensors' names; int8 scales are applied, not listed.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    ) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self._fd).st_size
            prefix = os.pread(self._fd, 8, 0)
            if len(prefix) < 8:
                raise PayloadError(f"{self.path}: too short to be a payload")
            length = int.from_bytes(prefix, "little")
            if length > max_header_bytes or 8 + length > size:
                raise PayloadError(f"{self.path}: header length {length} is invalid")
            self.header = parse_header(os.pread(self._fd, length, 8), data_length=size - 8 - length)
        except BaseException:
            self.close()  # and forget the descriptor: __del__ must not close a number reused since
            raise
        self._entries = self.header.by_name()
        self._names = sorted(n for n in self._entries if not is_scale_name(n))

    def read_raw(self, name: str) -> tuple[TensorEntry, np.ndarray]:
        entry = self._entries[name]
        data = os.pread(self._fd, entry.nbytes, self.header.data_start + entry.begin)
        if len(data) != entry.nbytes:
            raise PayloadError(f"{self.path}: tensor {name!r} is truncated", tensor=name)
        return entry, array_from_bytes(entry, data)

    def __getitem__(self, name: str) -> np.ndarray:
        if is_scale_name(name) or name not in self._entries:
            raise KeyError(name)
        entry, values = self.read_raw(name)
        if entry.dtype == "I8":
            scale_entry, scale_values = self.read_raw(scale_name(name))
            check_scale(entry, scale_entry, scale_values)
            return dequantize_int8(values, scale_values)
        if entry.dtype not in _FLOAT_DTYPES:
            raise PayloadError(
                f"tensor {name!r}: dtype {entry.dtype} is not a floating-point type", tensor=name
            )
        return values.astype(np.float32)


class IndexedPayloadFile(_PayloadReader):
    """Compact lazy reader for an upload already validated against a manifest, for aggregating many.

    A round may hold hundreds of uploads and aggregation reads every one of them tensor by tensor, so
    each reader keeps only numpy arrays of offsets (a few KiB, not a parsed JSON header). With
    `keep_open` it holds a file descriptor until `close()`; without, it opens the file per read, for
    rounds so large that one descriptor per upload could hit the process limit. Values are decoded to
    float32 like `TensorFile`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        names: Sequence[str],
        *,
        keep_open: bool = False,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        self.path = Path(path)
        self._fd = -1
        with TensorFile(self.path, max_header_bytes=max_header_bytes) as full:
            entries = full.header.by_name()
            self._data_start = full.header.data_start
        self._names = list(names)
        self._position = {name: i for i, name in enumerate(self._names)}
        count = len(self._names)
        self._begin = np.empty(count, np.int64)
        self._nbytes = np.empty(count, np.int64)
        self._scale_begin = np.full(count, -1, np.int64)
        self._scale_nbytes = np.zeros(count, np.int64)
        self._per_row = np.zeros(count, bool)
        self._shapes: list[tuple[int, ...]] = []
        dtypes = set()
        for i, name in enumerate(self._names):
            entry = entries.get(name)
            if entry is None:
                raise PayloadError(f"{self.path}: tensor {name!r} is missing", tensor=name)
            self._begin[i], self._nbytes[i] = entry.begin, entry.nbytes
            self._shapes.append(entry.shape)
            dtypes.add(entry.dtype)
            scale = entries.get(scale_name(name))
            if scale is not None:
                self._scale_begin[i], self._scale_nbytes[i] = scale.begin, scale.nbytes
                self._per_row[i] = scale.shape != ()
        if len(dtypes) != 1:
            raise PayloadError(f"{self.path}: mixed value dtypes {sorted(dtypes)}")
        self._dtype = dtypes.pop()
        if self._dtype not in _FLOAT_DTYPES and self._dtype != "I8":
            raise PayloadError(f"{self.path}: dtype {self._dtype} is not a delta encoding")
        if keep_open:
            self._fd = os.open(self.path, os.O_RDONLY)

    def __getitem__(self, name: str) -> np.ndarray:
        i = self._position[name]
        entry = TensorEntry(name, self._dtype, self._shapes[i], 0, int(self._nbytes[i]))
        fd = self._fd if self._fd >= 0 else os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, int(self._nbytes[i]), self._data_start + int(self._begin[i]))
            if len(raw) != entry.nbytes:
                raise PayloadError(f"{self.path}: tensor {name!r} is truncated", tensor=name)
            if self._dtype != "I8":
                return array_from_bytes(entry, raw).astype(np.float32)
            if self._scale_begin[i] < 0:
                raise PayloadError(f"{self.path}: tensor {name!r} has no scale", tensor=name)
            scale_raw = os.pread(fd, int(self._scale_nbytes[i]), self._data_start + int(self._scale_begin[i]))
        finally:
            if fd != self._fd:
                os.close(fd)
        scale_shape = self._shapes[i][:-1] if self._per_row[i] else ()
        scales = np.frombuffer(scale_raw, "<f4").reshape(scale_shape)
        return dequantize_int8(array_from_bytes(entry, raw), scales)
