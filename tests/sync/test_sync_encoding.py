"""The tensor payload format: canonical, safetensors-compatible, streamable, and compact in int8."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from sync_service import encoding as enc

from .sync_helpers import make_delta

# SmolLM2-135M 1G1S generalist: 30 layers x (gate, up, down) LoRA rank 8, d_model 576, d_ff 1536.
SMOL_SHAPES = {}
for _layer in range(30):
    for _proj, (_din, _dout) in {"gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}.items():
        SMOL_SHAPES[f"layers.{_layer}.mlp.{_proj}.lora_A"] = (1, 8, _din)
        SMOL_SHAPES[f"layers.{_layer}.mlp.{_proj}.lora_B"] = (1, _dout, 8)


@pytest.mark.parametrize("encoding", enc.ENCODINGS)
def test_round_trip_and_safetensors_interop(encoding: str) -> None:
    tensors = make_delta(0, dyadic=False)
    payload = enc.encode(tensors, encoding)
    assert payload == enc.encode(dict(reversed(list(tensors.items()))), encoding)  # canonical: order-free
    assert len(payload) == enc.encoded_size({n: v.shape for n, v in tensors.items()}, encoding)
    assert (8 + int.from_bytes(payload[:8], "little")) % 8 == 0  # data region 8-byte aligned
    decoded = enc.decode(payload)
    for name, value in tensors.items():
        assert decoded[name].dtype == np.float32
        if encoding == "int8":  # error at most half a quantisation step
            np.testing.assert_allclose(
                decoded[name], value, atol=float(np.abs(value).max()) / 254 + 1e-9, rtol=0
            )
        else:
            np.testing.assert_allclose(decoded[name], value, rtol=0 if encoding == "fp32" else 1e-3, atol=0)
    library_view = st_load(payload)  # the reference safetensors implementation reads our bytes
    assert set(library_view) >= set(tensors)
    if encoding == "fp32":
        for name, value in tensors.items():
            np.testing.assert_array_equal(library_view[name], value)


def test_decodes_files_written_by_the_safetensors_library_in_any_layout() -> None:
    tensors = {
        "b": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a": np.ones((3,), np.float16),
        "c": np.full((2, 2), 0.5, np.float64),
    }
    decoded = enc.decode(st_save(tensors, metadata={"who": "library"}))
    for name, value in tensors.items():
        np.testing.assert_array_equal(decoded[name], value.astype(np.float32))


def test_bf16_is_widened_exactly() -> None:
    values = np.array([1.0, -2.5, 3.140625], np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    header = enc.build_header([("x", "BF16", (3,))], None)
    np.testing.assert_array_equal(enc.decode(header + bits.tobytes())["x"], values)


@pytest.mark.parametrize("step", [1, 7, 4096, 10**9])
def test_incremental_decoder_accepts_any_slicing(step: int) -> None:
    tensors = make_delta(1)
    payload = enc.encode(tensors, "int8")
    seen: list[str] = []
    headers = []
    decoder = enc.PayloadDecoder(headers.append, lambda entry, raw: seen.append(entry.name))
    for start in range(0, len(payload), step):
        decoder.feed(payload[start : start + step])
    header = decoder.close()
    assert headers == [header] and header.total_bytes == len(payload)
    assert seen == [entry.name for entry in header.entries] and len(seen) == 2 * len(tensors)


def test_decoder_rejects_truncation_and_trailing_bytes() -> None:
    payload = enc.encode(make_delta(2))
    decoder = enc.PayloadDecoder()
    decoder.feed(payload[:-3])
    with pytest.raises(enc.PayloadError, match="truncated"):
        decoder.close()
    with pytest.raises(enc.PayloadError, match="after the last tensor"):
        enc.PayloadDecoder().feed(payload + b"\0")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, r"span 4 bytes but F32\[2\] needs 8"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "shape must be"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "gap"),
        ({"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype"),
        ({"x": [1, 2]}, "exactly dtype, shape and data_offsets"),
        ({"__metadata__": {"a": 1}}, "__metadata__ must be an object of strings"),
    ],
)
def test_header_validation_messages(header: dict, message: str) -> None:
    with pytest.raises(enc.PayloadError, match=message):
        enc.parse_header(json.dumps(header).encode())


def test_int8_quantisation_per_row_and_per_tensor() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 8, 576)).astype(np.float32)
    q, scale = enc.quantize_int8(x, "row")
    assert q.dtype == np.int8 and scale.shape == (1, 8)
    np.testing.assert_allclose(enc.dequantize_int8(q, scale), x, atol=float(scale.max()) / 2 + 1e-7)
    q, scale = enc.quantize_int8(x, "tensor")
    assert scale.shape == ()
    assert np.abs(q).max() == 127
    zeros_q, zeros_scale = enc.quantize_int8(np.zeros((2, 128), np.float32), "row")
    assert not zeros_q.any() and not zeros_scale.any()
    assert enc.int8_scale_shape((1, 1536, 8), "auto") == ()  # short rows: one scale per tensor
    assert enc.int8_scale_shape((1, 8, 1536), "auto") == (1, 8)
    with pytest.raises(enc.PayloadError, match="non-finite"):
        enc.quantize_int8(np.array([np.nan], np.float32))


def test_int8_payload_of_a_smollm2_generalist_is_under_027_of_fp32() -> None:
    rng = np.random.default_rng(3)
    delta = {name: rng.normal(0, 1e-3, size=shape).astype(np.float32) for name, shape in SMOL_SHAPES.items()}
    fp32 = enc.encode(delta, "fp32")
    int8 = enc.encode(delta, "int8")
    assert len(fp32) == pytest.approx(1_520_640 * 4, rel=0.01)
    assert len(int8) / len(fp32) <= 0.27
    decoded = enc.decode(int8)
    error = np.sqrt(sum(float(np.sum((decoded[n] - delta[n]) ** 2)) for n in delta))
    norm = np.sqrt(sum(float(np.sum(delta[n] ** 2)) for n in delta))
    assert error / norm < 0.02


def test_fp16_refuses_values_it_cannot_represent() -> None:
    with pytest.raises(enc.PayloadError, match="float16 range"):
        enc.encode({"x": np.array([1e6], np.float32)}, "fp16")


@pytest.mark.parametrize("encoding", enc.ENCODINGS)
def test_indexed_payload_file_matches_decode(tmp_path, encoding: str) -> None:
    tensors = make_delta(6, dyadic=False)
    path = tmp_path / "u.safetensors"
    path.write_bytes(enc.encode(tensors, encoding))
    reader = enc.IndexedPayloadFile(path, sorted(tensors))
    decoded = enc.decode(path.read_bytes())
    assert list(reader) == sorted(tensors)
    for name in tensors:
        np.testing.assert_array_equal(reader[name], decoded[name])


def test_tensor_file_reads_lazily(tmp_path) -> None:
    tensors = make_delta(5, dyadic=False)
    path = tmp_path / "p.safetensors"
    path.write_bytes(enc.encode(tensors, "int8"))
    with enc.TensorFile(path) as lazy:
        assert sorted(lazy) == sorted(tensors)
        decoded = enc.decode(path.read_bytes())
        for name in tensors:
            np.testing.assert_array_equal(lazy[name], decoded[name])
