"""The `.ptd` index reader (flatbuffers runtime, no executorch compiler) against executorch's own."""

from __future__ import annotations

import pytest

from edge_runtime.artifacts import ArtifactError, Manifest
from edge_runtime.artifacts.ptd import PtdEntry, read_index


def _reference_index(data: bytes) -> dict[str, PtdEntry]:
    """The same index through executorch's FlatTensor serializer (which imports executorch.exir)."""
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorHeader, _deserialize_to_flat_tensor

    header = FlatTensorHeader.from_bytes(data[8:])
    flat = _deserialize_to_flat_tensor(data[: header.flatbuffer_offset + header.flatbuffer_size])
    index = {}
    for named in flat.named_data:
        segment, layout = flat.segments[named.segment_index], named.tensor_layout
        index[named.key] = PtdEntry(offset=header.segment_base_offset + segment.offset, size=segment.size,
                                    segment=named.segment_index,
                                    sizes=tuple(layout.sizes) if layout is not None else None)
    return index


@pytest.mark.parametrize("artifact", ["pte", "pte-xnnpack", "pte-train"])
def test_index_equals_executorchs_reading(exported, artifact):
    manifest = Manifest.load(exported.directory)
    if artifact not in manifest.data["artifacts"]:
        pytest.skip(f"{artifact} not exported here")
    data = manifest.path(artifact, "data").read_bytes()
    index = read_index(data)

    assert index == _reference_index(data)
    assert len(index) >= 4 and all(e.offset + e.size <= len(data) for e in index.values())


def test_corrupt_index_is_a_clear_error(llama_export):
    data = Manifest.load(llama_export.directory).path("pte", "data").read_bytes()
    header_end = 8 + 40

    with pytest.raises(ArtifactError, match="not an ExecuTorch .ptd"):
        read_index(b"garbage" * 10, "x.ptd")
    with pytest.raises(ArtifactError, match="not an ExecuTorch .ptd"):
        read_index(data[:20], "x.ptd")
    with pytest.raises(ArtifactError, match="outside the file"):
        read_index(data[:header_end + 16], "x.ptd")
    with pytest.raises(ArtifactError, match="corrupt FlatTensor index"):  # root table beyond the index
        read_index((2**31 - 1).to_bytes(4, "little") + data[4:], "x.ptd")
    with pytest.raises(ArtifactError, match="beyond the file"):  # the last segment cut off
        read_index(data[:-1], "x.ptd")
    with pytest.raises(ArtifactError, match="corrupt FlatTensor index"):  # index bytes overwritten
        read_index(data[:header_end] + b"\xff" * (len(data) - header_end), "x.ptd")
