"""Byte-for-byte encoding interop, artifact integrity and bad input on the Java side of android_demo/core."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.artifacts.errors import ArtifactIntegrityError
from edge_runtime.artifacts.manifest import FORMAT_VERSION, Manifest, dumps, sha256_path
from edge_runtime.sync_client import SyncClient
from sync_service import encoding as wire

from .android_helpers import Jvm, java_client_args, serve
from tests.sync.sync_helpers import FAST_RETRY, REPO_ROOT, Tls, make_generalist

ENCODINGS = ("fp32", "fp16", "int8")


def _edge_case_tensors() -> dict[str, np.ndarray]:
    """Rounding corner cases for every encoding, per-row and per-tensor int8 shapes, odd names."""
    rng = np.random.default_rng(7)
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5, 127.0], np.float32) / np.float32(127)
    half_ties = np.array([1 + 2**-11, 1 + 3 * 2**-11, 2**-25, 3 * 2**-25, 2**-24, 6.1e-5, 65504, -65504], np.float32)
    return {
        "model.layers.0.mlp.down_proj.generalist_A": rng.normal(0, 0.02, (1, 8, 64)).astype(np.float32),
        "model.layers.0.mlp.up_proj.generalist_B": rng.normal(0, 1e-3, (1, 80, 8)).astype(np.float32),
        "rows.wide": rng.normal(0, 1, (3, 130)).astype(np.float32),
        "rows.zero": np.zeros((2, 64), np.float32),
        "ties.int8": ties,
        "ties.fp16": half_ties,
        "scalar": np.array(-0.0, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "neg.zero": np.array([-0.0, 0.0, -1e-45, 1e-45], np.float32),
        "naïve-ünïcode/\u20ac": rng.normal(0, 1, (2, 3)).astype(np.float32),
    }


def test_encodings_are_byte_identical_offline(jvm: Jvm, tmp_path: Path) -> None:
    tensors = _edge_case_tensors()
    source = tmp_path / "delta.fp32"
    source.write_bytes(wire.encode(tensors, "fp32"))
    for encoding in ENCODINGS:
        for granularity in ("auto", "tensor", "row") if encoding == "int8" else ("auto",):
            out = tmp_path / f"java.{encoding}.{granularity}"
            result = jvm.run(
                "encode",
                "--delta",
                str(source),
                "--encoding",
                encoding,
                "--granularity",
                granularity,
                "--out",
                str(out),
            )
            assert result.returncode == 0, result.stderr
            expected = wire.encode(tensors, encoding, int8_granularity=granularity)
            assert out.read_bytes() == expected, f"{encoding}/{granularity} differs"
            # Java's decoder reads Python's payload to the same float32 values.
            python_payload = tmp_path / f"py.{encoding}.{granularity}"
            python_payload.write_bytes(expected)
            decoded = tmp_path / f"decoded.{encoding}.{granularity}"
            assert jvm.run("decode", "--payload", str(python_payload), "--out", str(decoded)).returncode == 0
            assert decoded.read_bytes() == wire.encode(wire.decode(expected), "fp32")


def test_fp16_out_of_range_refused(jvm: Jvm, tmp_path: Path) -> None:
    source = tmp_path / "big.fp32"
    source.write_bytes(wire.encode({"x": np.array([65520.0], np.float32)}, "fp32"))
    result = jvm.run("encode", "--delta", str(source), "--encoding", "fp16", "--out", str(tmp_path / "o"))
    assert result.returncode == 8 and "float16 range" in result.stderr
    with pytest.raises(wire.PayloadError):
        wire.encode({"x": np.array([65520.0], np.float32)}, "fp16")


def test_same_delta_from_java_and_python_is_stored_identically(jvm: Jvm, android_tls: Tls, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    generalist = {
        "model.layers.0.mlp.gate_proj.generalist_A": (rng.integers(-64, 64, (1, 8, 64)) / 64).astype(np.float32),
        "model.layers.0.mlp.gate_proj.generalist_B": np.zeros((1, 96, 8), np.float32),
        "model.layers.1.mlp.down_proj.generalist_A": (rng.integers(-64, 64, (1, 8, 96)) / 64).astype(np.float32),
        "model.layers.1.mlp.down_proj.generalist_B": np.zeros((1, 64, 8), np.float32),
    }
    delta = {name: rng.normal(0, 0.01, value.shape).astype(np.float32) for name, value in generalist.items()}
    devices = [f"{side}-{encoding}" for encoding in ENCODINGS for side in ("java", "py")]
    served = serve(
        tmp_path,
        android_tls,
        devices,
        generalist,
        ["--min-devices", str(len(devices)), "--round-timeout", "60", "--rounds", "1"],
    )
    try:
        source = tmp_path / "delta.fp32"
        source.write_bytes(wire.encode(delta, "fp32"))
        jobs = []
        for encoding in ENCODINGS:
            jobs += ["--job", f"java-{encoding}:{served.token_files[f'java-{encoding}']}:{encoding}"]
        result = jvm.run(
            "upload",
            "--target",
            served.target,
            "--ca",
            str(android_tls.cert),
            "--round",
            "1",
            "--base",
            "0",
            "--samples",
            "100",
            "--delta",
            str(source),
            *jobs,
        )
        assert result.returncode == 0, result.stderr
        assert len(result.of("uploaded")) == 3
        for encoding in ENCODINGS:
            name = f"py-{encoding}"
            with SyncClient(
                served.target,
                served.token(name),
                device_id=name,
                root_certificates=android_tls.cert_pem,
                retry=FAST_RETRY,
            ) as client:
                client.upload_delta(1, 0, delta, 100, encoding=encoding)
        rows = served.upload_rows(1)
        for encoding in ENCODINGS:
            java_bytes = served.upload_bytes(1, f"java-{encoding}")
            python_bytes = served.upload_bytes(1, f"py-{encoding}")
            assert java_bytes == python_bytes, encoding
            assert rows[f"java-{encoding}"].payload_sha256 == rows[f"py-{encoding}"].payload_sha256
            assert rows[f"java-{encoding}"].update_norm == rows[f"py-{encoding}"].update_norm
            stored = wire.decode(java_bytes)
            for name, value in wire.decode(wire.encode(delta, encoding)).items():
                np.testing.assert_array_equal(stored[name], value)
        served.wait_published(1)
    finally:
        served.close()


# ------------------------------------------------------------------------------------------- artifacts


def _export_dir(path: Path) -> Path:
    """A minimal, valid comigs export directory (the current format_version) with two hashed files."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(3)
    (path / "training.pte").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (path / "training.g0000.experts.ptd").write_bytes(rng.integers(0, 256, 8192, dtype=np.uint8).tobytes())
    files = {
        name: {"sha256": sha256_path(path / name), "bytes": (path / name).stat().st_size}
        for name in ("training.pte", "training.g0000.experts.ptd")
    }
    manifest = {
        "format": "comigs-export",
        "format_version": FORMAT_VERSION,
        "export_id": 123456789,
        "generation": 0,
        "base_model": {"model_type": "llama"},
        "comigs": {"num_generalists": 1, "num_specialists": 1},
        "parameters": [
            {
                "name": "model.layers.0.mlp.gate_proj.generalist_A",
                "shape": [1, 8, 64],
                "dtype": "float32",
                "role": "generalist",
            }
        ],
        "artifacts": {
            "pte-train": {
                "kind": "executorch-training",
                "files": {"program": "training.pte", "data": "training.g0000.experts.ptd"},
            }
        },
        "files": files,
    }
    (path / "manifest.json").write_bytes(dumps(manifest))
    return path


def test_tampered_artifact_refused(jvm: Jvm, tmp_path: Path) -> None:
    good = _export_dir(tmp_path / "export")
    Manifest.load(good).verify()  # the Python loader accepts it ...
    ok = jvm.run("verify-artifacts", "--dir", str(good), "--artifact", "pte-train")
    assert ok.returncode == 0 and ok.of("artifacts_verified")[0]["export_id"] == 123456789  # ... and Java too

    ptd = good / "training.g0000.experts.ptd"
    original = ptd.read_bytes()
    ptd.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])  # one bit flipped
    with pytest.raises(ArtifactIntegrityError):
        Manifest.load(good).verify()
    bad = jvm.run("verify-artifacts", "--dir", str(good))
    assert bad.returncode == 6
    assert "training.g0000.experts.ptd" in bad.stderr and "does not match the manifest" in bad.stderr
    assert "tampered" in bad.stderr

    ptd.write_bytes(original[:-1])  # truncated
    assert "truncated" in jvm.run("verify-artifacts", "--dir", str(good)).stderr
    ptd.unlink()  # missing
    assert "missing" in jvm.run("verify-artifacts", "--dir", str(good)).stderr
    ptd.write_bytes(original)
    assert jvm.run("verify-artifacts", "--dir", str(good)).returncode == 0

    manifest = json.loads((good / "manifest.json").read_text())
    for change, message in (
        ({"format_version": FORMAT_VERSION + 1}, f"format_version {FORMAT_VERSION + 1}"),
        ({"files": {"../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}}, "invalid file"),
    ):
        (good / "manifest.json").write_bytes(dumps({**manifest, **change}))
        result = jvm.run("verify-artifacts", "--dir", str(good))
        assert result.returncode == 6 and message in result.stderr, result.stderr
    (good / "manifest.json").write_text("{not json")
    assert "not valid JSON" in jvm.run("verify-artifacts", "--dir", str(good)).stderr


# ------------------------------------------------------------------------------------------- bad input


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _valid_state_with_pending_upload(directory: Path) -> Path:
    """A state file as the app leaves it when killed after persisting its key: nothing may be lost."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = wire.encode({"x": np.ones((2, 2), np.float32)}, "fp32")
    (directory / "pending").mkdir(exist_ok=True)
    (directory / "pending" / "round-000001.fp32.payload").write_bytes(payload)
    state = {
        "format": "comigs-android-device-state/1",
        "device_id": "java-phone",
        "rounds_completed": 0,
        "last_metrics": {},
        "uploads": {
            "1": {
                "base_version": 0,
                "key": "java-phone-r1-abc",
                "acknowledged": False,
                "upload_id": "",
                "duplicate": False,
                "encoding": "fp32",
                "num_samples": 100,
                "payload_file": "pending/round-000001.fp32.payload",
                "payload_sha256": hashlib.sha256(payload).hexdigest(),
                "status": "pending",
                "reason": "",
            }
        },
    }
    path = directory / "state.json"
    path.write_text(json.dumps(state))
    return path


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_unreachable_coordinator_fails_clearly_and_keeps_state(jvm: Jvm, android_tls: Tls, tmp_path: Path) -> None:
    state = _valid_state_with_pending_upload(tmp_path / "device")
    token = tmp_path / "token"
    token.write_text("cmgs1.0123456789abcdef." + "A" * 43)
    before = _snapshot(state.parent)
    result = jvm.run(
        "run",
        "--target",
        f"127.0.0.1:{_free_port()}",
        "--device",
        "java-phone",
        "--token-file",
        str(token),
        "--ca",
        str(android_tls.cert),
        "--state",
        str(state),
        "--max-attempts",
        "3",
        "--initial-backoff-ms",
        "50",
    )
    assert result.returncode == 3, result.stderr
    assert "UNAVAILABLE" in result.stderr and "after 3 attempts" in result.stderr
    assert "nothing was lost" in result.stderr
    assert _snapshot(state.parent) == before  # the pending upload and its key survive for the next start


def test_revoked_token_and_corrupt_state_and_tampered_artifacts(jvm: Jvm, android_tls: Tls, tmp_path: Path) -> None:
    served = serve(
        tmp_path,
        android_tls,
        ["java-phone", "py-a"],
        make_generalist(0),
        ["--min-devices", "2", "--round-timeout", "60", "--rounds", "1"],
    )
    try:
        args = java_client_args(served, android_tls, "java-phone")

        # Artifact hash mismatch: refused before anything is trained or sent.
        export = _export_dir(tmp_path / "export")
        (export / "training.pte").write_bytes(b"\0" + (export / "training.pte").read_bytes()[1:])
        state = tmp_path / "device" / "state.json"
        result = jvm.run(
            "run", *args, "--state", str(state), "--rounds", "1", "--artifacts", str(export), "--artifact", "pte-train"
        )
        assert result.returncode == 6 and "training.pte" in result.stderr and "refusing to load" in result.stderr
        assert not result.of("training") and served.upload_rows(1) == {}

        # Corrupt state file: clear error, file untouched, no network call needed.
        state.parent.mkdir(parents=True, exist_ok=True)
        garbage = b'{"format": "comigs-android-device-state/1", "uploads": {"1": '
        state.write_bytes(garbage)
        result = jvm.run("run", *args, "--state", str(state), "--rounds", "1")
        assert result.returncode == 5 and "corrupt" in result.stderr and "left untouched" in result.stderr
        assert state.read_bytes() == garbage
        # --reset-state moves it aside (bytes kept) and the device carries on.
        result = jvm.run(
            "run", *args, "--state", str(state), "--rounds", "1", "--reset-state", "--idle-timeout-ms", "30000"
        )
        assert result.returncode == 0, result.stderr
        (aside,) = state.parent.glob("state.json.corrupt-*")
        assert aside.read_bytes() == garbage
        assert [e["round"] for e in result.of("uploaded")] == [1]

        # Revoked token: PERMISSION_DENIED at once (no retries), clear message, state kept.
        subprocess.run(
            [sys.executable, "-m", "sync_service", "revoke-device", "--state-dir", str(served.state_dir), "java-phone"],
            check=True,
            capture_output=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        before = _snapshot(state.parent)
        result = jvm.run("run", *args, "--state", str(state), "--rounds", "1")
        assert result.returncode == 4, result.stderr
        assert "PERMISSION_DENIED" in result.stderr and "revoked" in result.stderr
        assert "after" not in result.stderr.split("PERMISSION_DENIED")[0]  # not retried
        assert _snapshot(state.parent) == before
        # The upload acknowledged before the revocation still counts.
        assert list(served.upload_rows(1)) == ["java-phone"]
    finally:
        served.close()
