"""ExecuTorch `.ptd` data files: find where each named tensor lives and overwrite it in place.

A `.ptd` (FlatTensor) file is a small flatbuffer index plus aligned data segments; each key
(a parameter FQN, or on the XNNPACK path the sha256 of the bytes it was exported with) points
at one segment. Expert values change but their shapes never do, so swapping experts only has
to overwrite the bytes of their segments: nothing is re-serialized, alignment and every other
byte stay exactly as the exporter wrote them, and the runtime reads the new values on its
next load. (Re-serializing with `FlatTensorSerializer` would lose the alignment the XNNPACK
delegate was exported with.)
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.artifacts.errors import ArtifactError, ArtifactInputError

_FLOAT32 = np.dtype("<f4")


@dataclasses.dataclass(frozen=True)
class PtdEntry:
    """Where one key's bytes are in the file."""

    offset: int
    size: int
    segment: int
    sizes: tuple[int, ...] | None  # tensor shape when the entry carries a layout (non-delegated constants)


# The FlatTensor extended header, right after the flatbuffer's root offset and file identifier:
# magic, length (u32); flatbuffer offset, flatbuffer size, segment base offset, segment data size (u64).
_HEADER = struct.Struct("<4sIQQQQ")
_HEADER_MAGIC = b"FH01"
_FILE_IDENTIFIER = b"FT01"


def read_index(data: bytes, source: str = "<ptd>") -> dict[str, PtdEntry]:
    """key -> location of its bytes, from a whole .ptd file's contents.

    Read with the flatbuffers runtime and the FlatTensor schema's field order
    (executorch/extension/flat_tensor/serialize/flat_tensor.fbs) rather than executorch's serializer,
    which imports `executorch.exir` (~130 MB resident) into a device process that only swaps weights.
    """
    if len(data) < 8 + _HEADER.size or data[4:8] != _FILE_IDENTIFIER or data[8:12] != _HEADER_MAGIC:
        raise ArtifactError(f"{source} is not an ExecuTorch .ptd file (bad FlatTensor header).")
    _, _, flatbuffer_offset, flatbuffer_size, segment_base, _ = _HEADER.unpack_from(data, 8)
    end = flatbuffer_offset + flatbuffer_size  # the flatbuffer proper, with its prefix and this header
    if end > len(data) or segment_base > len(data):
        raise ArtifactError(f"{source}: FlatTensor header points outside the file ({len(data)} bytes).")
    try:
        index = _named_data(memoryview(data)[:end], segment_base)
    except (IndexError, ValueError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
        raise ArtifactError(f"{source}: corrupt FlatTensor index ({exc}).") from None
    outside = next((key for key, e in index.items() if e.offset + e.size > len(data)), None)
    if outside is not None:
        raise ArtifactError(f"{source}: corrupt FlatTensor index ({outside!r} lies beyond the file's "
                            f"{len(data)} bytes; the file is truncated).")
    return index


def _named_data(buf: memoryview, segment_base: int) -> dict[str, PtdEntry]:
    from flatbuffers import number_types as N
    from flatbuffers.table import Table

    def table(pos: int) -> Table:
        return Table(buf, pos)

    def field(t: Table, slot: int) -> int:  # 0 when the field is absent
        return t.Offset(4 + 2 * slot)

    def scalar(t: Table, slot: int, flags: Any) -> int:
        o = field(t, slot)
        return int(t.Get(flags, t.Pos + o)) if o else 0

    def tables(t: Table, slot: int) -> list[Table]:
        o = field(t, slot)
        if not o:
            return []
        start = t.Vector(o)
        return [table(t.Indirect(start + 4 * i)) for i in range(t.VectorLen(o))]

    root = table(int.from_bytes(buf[:4], "little"))
    segments = [(scalar(s, 0, N.Uint64Flags), scalar(s, 1, N.Uint64Flags)) for s in tables(root, 1)]
    index: dict[str, PtdEntry] = {}
    for named in tables(root, 2):
        key = bytes(named.String(named.Pos + field(named, 0))).decode()
        segment = scalar(named, 1, N.Uint32Flags)
        offset, size = segments[segment]
        sizes = None
        layout_at = field(named, 2)
        if layout_at:
            layout = table(named.Indirect(named.Pos + layout_at))
            o = field(layout, 1)
            sizes = tuple(int(layout.Get(N.Int32Flags, layout.Vector(o) + 4 * i))
                          for i in range(layout.VectorLen(o))) if o else ()
        index[key] = PtdEntry(offset=segment_base + offset, size=size, segment=segment, sizes=sizes)
    return index


def tensor_bytes(value: np.ndarray | object) -> bytes:
    """Little-endian float32 C-order bytes of a numpy array or torch tensor."""
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().to("cpu").contiguous().float().numpy()
    return np.ascontiguousarray(np.asarray(value), dtype=_FLOAT32).tobytes()


def ref_bytes(array: np.ndarray, ref: Mapping[str, object]) -> bytes:
    """Bytes a key holds for one tensor: the whole tensor, or the slice `array[index]` of a
    stacked expert tensor that the exporter split per expert (manifest ref {"key", "index"})."""
    index = ref.get("index")
    part = array if index is None else array[int(index)]  # type: ignore[arg-type]
    return tensor_bytes(part)


def patch(data: bytes, index: Mapping[str, PtdEntry], values: Mapping[str, bytes], source: str = "<ptd>") -> bytes:
    """A copy of `data` with the segments of `values`' keys overwritten (sizes must match)."""
    out = bytearray(data)
    for key, payload in values.items():
        entry = index.get(key)
        if entry is None:
            raise ArtifactInputError(f"{source} has no tensor under key {key!r}; the manifest's key map does not "
                                     "match the data file (re-export the artifacts).")
        if len(payload) != entry.size:
            raise ArtifactInputError(f"{source}: {key!r} holds {entry.size} bytes, the new value has {len(payload)}; "
                                     "the shapes differ.")
        out[entry.offset:entry.offset + entry.size] = payload
    return bytes(out)


def read_tensor(data: bytes, entry: PtdEntry, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 tensor stored in one entry (a copy)."""
    return np.frombuffer(data, dtype=_FLOAT32, count=entry.size // 4, offset=entry.offset).reshape(shape).copy()


def read_file(path: Path) -> tuple[bytes, dict[str, PtdEntry]]:
    data = Path(path).read_bytes()
    return data, read_index(data, str(path))
