"""manifest.json: what a directory of exported artifacts contains, and the proof that it is intact.

A device trusts an artifact directory only through its manifest: which base model and expert
layout the programs were exported for, every parameter's name/shape/dtype/role (decided by
`edge_runtime.roles`), which file holds which pluggable tensor under which key, and every
file's sha256. Loaders call `Manifest.load(dir)` and `verify(...)` *before* handing any byte
to a runtime, so a truncated download or a tampered file is refused with a clear error
instead of crashing (or silently misbehaving) inside ExecuTorch or ONNX Runtime.

The manifest is also the commit point of an export or a swap: files are written under
new names first and the manifest is replaced atomically last, so a reader sees either the
old complete set or the new complete set.

Schema (format_version 2), top level:

    format            "comigs-export"
    format_version    2; a reader refuses any other value (version 1 inference programs took
                      input_ids alone and returned logits at every position; version 2 ones also
                      take the positions to compute logits for, see export.prepare.InferenceModule)
    export_id         random integer also embedded in every program (ties programs to this manifest)
    generation        0 after export, +1 per expert swap (file names carry it)
    created_at, updated_at   ISO-8601 UTC
    tools             versions of torch, executorch, onnx, ... that wrote the programs
    base_model        identity of the frozen base (model_type, sizes, source) and weights_sha256
    comigs            the CoMiGS expert layout (CoMiGSConfig.to_dict())
    experts_source    where the expert values currently in the artifacts came from
    parameters        [{name, shape, dtype, role}] for every model parameter
    artifacts         {name: {kind, files: {role: file}, pluggable: {param: [keys]}, ...}}
    files             {file: {sha256, bytes}} for every file of every artifact
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edge_runtime.artifacts.errors import ArtifactIntegrityError, ManifestError, ManifestVersionError

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "comigs-export"
FORMAT_VERSION = 2

# Artifact kinds and the names `comigs export --formats` gives them.
KIND_ET_INFERENCE = "executorch-inference"
KIND_ET_TRAINING = "executorch-training"
KIND_ONNX = "onnx"

# How a program carries the manifest's identity, so a program from another export (or from an
# exporter with another format version) is refused even when someone "fixed" the hashes.
ET_FORMAT_VERSION_METHOD = "comigs_format_version"
ET_EXPORT_ID_METHOD = "comigs_export_id"
ONNX_FORMAT_VERSION_KEY = "comigs.format_version"
ONNX_EXPORT_ID_KEY = "comigs.export_id"

_REQUIRED_KEYS = ("format", "format_version", "export_id", "generation", "base_model", "comigs",
                  "parameters", "artifacts", "files")


def sha256_path(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dumps(data: dict[str, Any]) -> bytes:
    """The manifest's on-disk form (stable key order, so diffs between generations are readable)."""
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def _check_file_name(name: Any) -> str:
    """Manifest file names are plain names inside the directory: no paths, no traversal."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
            or name.startswith("."):
        raise ManifestError(f"manifest names an invalid file {name!r}: artifact files must be plain file "
                            "names inside the artifact directory.")
    return name


class Manifest:
    """A parsed, structurally validated manifest.json of one artifact directory."""

    def __init__(self, directory: Path, data: dict[str, Any]) -> None:
        self.directory = directory
        self.data = data

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{path} not found: {directory} is not a comigs export directory "
                                "(create one with `comigs export --out DIR`).")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path} is not valid JSON ({exc}); the export is corrupt: re-export or "
                                "restore the directory.") from exc
        return cls.from_dict(directory, data)

    @classmethod
    def from_dict(cls, directory: Path, data: Any) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ManifestError(f"{directory / MANIFEST_FILE} is not a comigs export manifest "
                                f"(format must be {FORMAT_NAME!r}).")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestVersionError(
                f"{directory / MANIFEST_FILE} has format_version {version!r}, but this comigs-edge reads "
                f"version {FORMAT_VERSION}: re-export the artifacts with this version of `comigs export` "
                "(or update the device software).")
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise ManifestError(f"{directory / MANIFEST_FILE} lacks {missing}; the manifest is incomplete.")
        for name in data["files"]:
            _check_file_name(name)
        for art_name, art in data["artifacts"].items():
            for role, file in art.get("files", {}).items():
                if _check_file_name(file) not in data["files"]:
                    raise ManifestError(f"artifact {art_name!r} uses {file!r} ({role}) but the manifest "
                                        "records no hash for it; the manifest is inconsistent.")
        return cls(directory, data)

    # -- accessors ----------------------------------------------------------------------------
    @property
    def export_id(self) -> int:
        return int(self.data["export_id"])

    @property
    def generation(self) -> int:
        return int(self.data["generation"])

    @property
    def artifact_names(self) -> list[str]:
        return sorted(self.data["artifacts"])

    def artifact(self, name: str) -> dict[str, Any]:
        try:
            return self.data["artifacts"][name]
        except KeyError:
            raise ManifestError(f"{self.directory} has no {name!r} artifact (it has: "
                                f"{', '.join(self.artifact_names) or 'none'}); export it with "
                                f"`comigs export --formats {name} ...`.") from None

    def path(self, artifact: str, role: str) -> Path:
        """Absolute path of one file of an artifact (role: 'program', 'data', 'model', ...)."""
        files = self.artifact(artifact)["files"]
        if role not in files:
            raise ManifestError(f"artifact {artifact!r} has no {role!r} file in the manifest.")
        return self.directory / files[role]

    def parameters(self) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in self.data["parameters"]}

    def pluggable(self, artifact: str) -> dict[str, list[dict[str, Any]]]:
        """Parameter name -> refs {"key": ...} (whole tensor) or {"key": ..., "index": e} (the slice
        P[e]) under which the artifact stores it (.ptd keys, ONNX initializer names)."""
        return self.artifact(artifact).get("pluggable", {})

    # -- integrity ----------------------------------------------------------------------------
    def verify(self, artifacts: Iterable[str] | None = None) -> None:
        """sha256 of every file of the given artifacts (all when None) against the manifest."""
        names = self.artifact_names if artifacts is None else list(artifacts)
        files: list[str] = []
        for name in names:
            files.extend(self.artifact(name)["files"].values())
        for file in dict.fromkeys(files):
            self.verify_file(file)

    def verify_file(self, file: str) -> None:
        entry = self.data["files"].get(file)
        if entry is None:
            raise ManifestError(f"{file} is not listed in {self.directory / MANIFEST_FILE}.")
        path = self.directory / file
        if not path.is_file():
            raise ArtifactIntegrityError(f"{path} is listed in the manifest but missing: the export is "
                                         "incomplete; re-export or restore the directory.")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactIntegrityError(f"{path} has {size} bytes, the manifest says {entry['bytes']}: the file "
                                         "is truncated or was replaced; re-export or restore it.")
        actual = sha256_path(path)
        if actual != entry["sha256"]:
            raise ArtifactIntegrityError(f"{path}: sha256 {actual[:16]}... does not match the manifest "
                                         f"({entry['sha256'][:16]}...): the file is corrupted or was tampered "
                                         "with; refusing to load it. Re-export or restore the directory.")


def check_program_identity(manifest: Manifest, artifact: str, format_version: Any, export_id: Any) -> None:
    """Refuse a program whose embedded identity differs from the manifest's."""
    if format_version != FORMAT_VERSION:
        raise ManifestVersionError(
            f"{artifact}: the program was written with comigs export format {format_version!r}, this loader reads "
            f"{FORMAT_VERSION}; re-export the artifacts.")
    if export_id != manifest.export_id:
        raise ManifestVersionError(
            f"{artifact}: the program belongs to export {export_id!r}, but {manifest.directory / MANIFEST_FILE} "
            f"describes export {manifest.export_id}; the directory mixes files of two exports. Re-export it.")
