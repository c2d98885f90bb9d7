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
from collections.abc import Mapping
from pathlib import Path

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


def read_index(data: bytes, source: str = "<ptd>") -> dict[str, PtdEntry]:
    """key -> location of its bytes, from a whole .ptd file's contents."""
    try:
        from executorch.extension.flat_tensor.serialize.serialize import (
            FlatTensorHeader,
            _deserialize_to_flat_tensor,
        )
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ArtifactError("reading .ptd files needs the `executorch` package (pip install executorch).") from exc
    header = FlatTensorHeader.from_bytes(data[8:])
    if not header.is_valid():
        raise ArtifactError(f"{source} is not an ExecuTorch .ptd file (bad FlatTensor header).")
    flat = _deserialize_to_flat_tensor(data[: header.flatbuffer_offset + header.flatbuffer_size])
    index: dict[str, PtdEntry] = {}
    for named in flat.named_data:
        segment = flat.segments[named.segment_index]
        layout = named.tensor_layout
        index[named.key] = PtdEntry(offset=header.segment_base_offset + segment.offset, size=segment.size,
                                    segment=named.segment_index,
                                    sizes=tuple(layout.sizes) if layout is not None else None)
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
