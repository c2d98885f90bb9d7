"""Replace expert tensors in every artifact of an export directory, atomically.

New generalists arrive every round and specialists/routers change on the device; the programs
stay, only their data changes. A swap:

1. verifies the manifest hashes of everything it builds on and validates the new tensors
   (names, shapes, dtypes, finiteness; a role is replaced completely or not at all);
2. writes generation n+1 of every data file next to generation n, by overwriting only the
   swapped tensors' bytes (ExecuTorch `.ptd` segments, ONNX external-data ranges; for ONNX also a
   new small graph file pointing at the new data file), and re-reads each new file to check it;
3. commits by atomically replacing manifest.json (new file names, hashes, generation, source);
4. deletes generation n.

A failure before step 3 removes the new files and leaves generation n untouched; a crash leaves
at worst unreferenced generation-n+1 files, which the next swap removes. A lock file serialises
concurrent swaps of one directory.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import fcntl
import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import roles
from edge_runtime.artifacts import layout, ptd
from edge_runtime.artifacts.errors import ArtifactInputError, ManifestError
from edge_runtime.artifacts.inputs import check_experts
from edge_runtime.artifacts.manifest import (
    KIND_ET_INFERENCE,
    KIND_ET_TRAINING,
    KIND_ONNX,
    MANIFEST_FILE,
    Manifest,
    dumps,
    sha256_path,
)
from edge_runtime.storage import atomic_write_bytes

LOCK_FILE = ".swap.lock"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tensors_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """Content identity of a set of named tensors (name, shape and float32 bytes, sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode() + b"\0" + str(tuple(arrays[name].shape)).encode() + b"\0")
        digest.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


def validate_experts(manifest: Manifest, experts: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """float32 arrays of `experts`, checked against the manifest; every role present must be complete."""
    params = manifest.parameters()
    pluggable = {name: [] for name, p in params.items() if p["role"] != roles.Role.FROZEN.value}
    if not experts:
        raise ArtifactInputError("no expert tensors given; nothing to swap.")
    arrays = check_experts(experts, params, pluggable)
    for role in {params[name]["role"] for name in arrays}:
        expected = {name for name, p in params.items() if p["role"] == role}
        missing = sorted(expected - set(arrays))
        if missing:
            raise ArtifactInputError(f"{role} tensors are incomplete: missing {len(missing)} of {len(expected)} "
                                     f"(first: {missing[0]!r}); a role is swapped completely or not at all.")
    return arrays


def _swap_ptd(directory: Path, entry: dict[str, Any], fmt: str, arrays: Mapping[str, np.ndarray],
              generation: int) -> list[str]:
    keymap = entry["pluggable"]
    source = directory / entry["files"]["data"]
    data, index = ptd.read_file(source)
    values = {ref["key"]: ptd.ref_bytes(arrays[name], ref) for name in arrays if name in keymap for ref in keymap[name]}
    new_name = layout.data_file(fmt, generation)
    _write(directory / new_name, ptd.patch(data, index, values, str(source)), like=source)
    check, check_index = ptd.read_file(directory / new_name)
    for key, payload in values.items():
        entry_ = check_index[key]
        if check[entry_.offset:entry_.offset + entry_.size] != payload:
            raise ManifestError(f"{new_name}: {key} reads back differently after writing; disk error?")
    entry["files"]["data"] = new_name
    return [new_name]


def _external(tensor: Any) -> dict[str, str]:
    return {kv.key: kv.value for kv in tensor.external_data}


def _swap_onnx(directory: Path, entry: dict[str, Any], fmt: str, arrays: Mapping[str, np.ndarray],
               generation: int) -> list[str]:
    import onnx

    old_data = entry["files"]["data"]
    proto = onnx.load(str(directory / entry["files"]["model"]), load_external_data=False)
    by_initializer = {ref["key"]: name for name, refs in entry["pluggable"].items() for ref in refs}
    data = bytearray((directory / old_data).read_bytes())
    new_data, new_model = layout.data_file(fmt, generation), layout.onnx_model_file(generation)
    written: dict[str, bytes] = {}
    for tensor in proto.graph.initializer:
        ext = _external(tensor)
        if ext.get("location") != old_data:
            continue
        name = by_initializer.get(tensor.name)
        if name is None:
            raise ManifestError(f"{tensor.name} lives in the expert data file but the manifest does not map it.")
        if name in arrays:
            payload = arrays[name].tobytes()
            offset, length = int(ext.get("offset", 0)), int(ext["length"])
            if length != len(payload):
                raise ArtifactInputError(f"{tensor.name}: {length} bytes in the model, {len(payload)} given.")
            data[offset:offset + length] = payload
            written[tensor.name] = payload
        for kv in tensor.external_data:
            if kv.key == "location":
                kv.value = new_data
    _write(directory / new_data, bytes(data), like=directory / old_data)
    _write(directory / new_model, proto.SerializeToString(), like=directory / entry["files"]["model"])
    check = (directory / new_data).read_bytes()
    for tensor in proto.graph.initializer:
        if tensor.name in written:
            ext = _external(tensor)
            offset, length = int(ext.get("offset", 0)), int(ext["length"])
            if check[offset:offset + length] != written[tensor.name]:
                raise ManifestError(f"{new_data}: {tensor.name} reads back differently after writing; disk error?")
    entry["files"]["data"], entry["files"]["model"] = new_data, new_model
    return [new_data, new_model]


def _write(path: Path, data: bytes, like: Path) -> None:
    """Atomic write with the permissions of the file it succeeds (mkstemp would make it 0600)."""
    atomic_write_bytes(path, data)
    os.chmod(path, like.stat().st_mode & 0o777)


def _remove_unreferenced(directory: Path, referenced: set[str]) -> None:
    """Delete earlier generations (and orphans of crashed swaps); never touches other files."""
    for path in directory.iterdir():
        if path.is_file() and path.name not in referenced and layout.generation_of(path.name) is not None:
            path.unlink(missing_ok=True)


def swap_experts(directory: str | Path, experts: Mapping[str, Any], *,
                 source: Mapping[str, Any] | None = None) -> Manifest:
    """Write `experts` (parameter name -> tensor) into every artifact of `directory`; returns the new manifest.

    Raises ArtifactIntegrityError if the current artifacts do not match their manifest,
    ArtifactInputError if the tensors do not fit; in both cases nothing is changed.
    """
    directory = Path(directory)
    with _locked(directory):
        manifest = Manifest.load(directory)
        manifest.verify()
        arrays = validate_experts(manifest, experts)
        generation = manifest.generation + 1
        data = copy.deepcopy(manifest.data)
        created: list[str] = []
        try:
            for fmt in manifest.artifact_names:
                entry = data["artifacts"][fmt]
                if not set(arrays) & set(entry.get("pluggable", {})):
                    continue
                if entry["kind"] in (KIND_ET_INFERENCE, KIND_ET_TRAINING):
                    created += _swap_ptd(directory, entry, fmt, arrays, generation)
                elif entry["kind"] == KIND_ONNX:
                    created += _swap_onnx(directory, entry, fmt, arrays, generation)
                else:
                    raise ManifestError(f"artifact {fmt!r} has unknown kind {entry['kind']!r}.")
            referenced = {f for art in data["artifacts"].values() for f in art["files"].values()}
            data["files"] = {f: e for f, e in data["files"].items() if f in referenced}
            for file in created:
                path = directory / file
                data["files"][file] = {"sha256": sha256_path(path), "bytes": path.stat().st_size}
            params = manifest.parameters()
            now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
            for role in sorted({params[n]["role"] for n in arrays}):
                role_arrays = {n: a for n, a in arrays.items() if params[n]["role"] == role}
                data.setdefault("experts_source", {})[role] = {
                    **dict(source or {}), "tensors": len(role_arrays),
                    "sha256": tensors_digest(role_arrays), "swapped_at": now}
            data["generation"] = generation
            data["updated_at"] = now
            _write(directory / MANIFEST_FILE, dumps(data), like=directory / MANIFEST_FILE)
        except BaseException:
            if not _committed(directory, generation):
                for file in created:
                    (directory / file).unlink(missing_ok=True)
            raise
        _remove_unreferenced(directory, set(data["files"]))
        return Manifest.load(directory)


def _committed(directory: Path, generation: int) -> bool:
    """Whether manifest.json already names `generation` (the rename happened, only a later fsync failed)."""
    try:
        return Manifest.load(directory).generation == generation
    except Exception:  # noqa: BLE001 - an unreadable manifest is "not committed"
        return False
