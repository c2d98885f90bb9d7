"""Build manifest.json for a fresh export (the reader and the schema live in edge_runtime.artifacts.manifest).

Records what a device needs to trust and use the artifacts without the model: the frozen base
model's identity and a hash of its weights, the expert layout, every parameter's name, shape,
dtype and role (asked of `edge_runtime.roles`), each artifact's files, keys and memory needs,
the versions of the tools that wrote them, and the sha256 of every file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime import roles
from edge_runtime.artifacts.manifest import FORMAT_NAME, FORMAT_VERSION, sha256_path
from edge_runtime.artifacts.swap import tensors_digest
from edge_runtime.model.adapters import base_identity
from edge_runtime.model.config import CoMiGSConfig

TOOLS = ("torch", "executorch", "onnx", "onnxruntime", "onnxscript", "transformers", "comigs-edge")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in TOOLS:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def weights_sha256(model: nn.Module) -> str:
    """Hash of the frozen base weights (names, shapes, dtypes, bytes), independent of the file format
    the base came from: two exports share it iff their base models are numerically identical."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if roles.role_of(name) is not roles.Role.FROZEN:
            continue
        tensor = param.detach().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def base_model_info(model: nn.Module) -> dict[str, Any]:
    info = base_identity(model)
    info["weights_sha256"] = weights_sha256(model)
    info["frozen_parameters"] = sum(p.numel() for n, p in model.named_parameters()
                                    if roles.role_of(n) is roles.Role.FROZEN)
    return info


def parameter_table(model: nn.Module) -> list[dict[str, Any]]:
    return [{"name": name, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
             "role": roles.role_of(name).value} for name, p in model.named_parameters()]


def experts_source(values: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Per role: where the exported expert values came from and a digest of them."""
    out: dict[str, Any] = {}
    for role in (roles.Role.GENERALIST, roles.Role.SPECIALIST, roles.Role.ROUTER):
        arrays = {n: t.detach().float().numpy() for n, t in values.items() if roles.role_of(n) is role}
        if arrays:
            out[role.value] = {"source": source, "tensors": len(arrays), "sha256": tensors_digest(arrays)}
    return out


def file_table(directory: Path, artifacts: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    files = {f for entry in artifacts.values() for f in entry["files"].values()}
    return {f: {"sha256": sha256_path(directory / f), "bytes": (directory / f).stat().st_size} for f in sorted(files)}


def build_manifest(model: nn.Module, config: CoMiGSConfig, artifacts: Mapping[str, dict[str, Any]],
                   export_id: int, staging: Path, values: Mapping[str, torch.Tensor], source: str,
                   options: Mapping[str, Any]) -> dict[str, Any]:
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "export_id": export_id,
        "generation": 0,
        "created_at": now,
        "updated_at": now,
        "tools": tool_versions(),
        "base_model": base_model_info(model),
        "comigs": config.to_dict(),
        "experts_source": experts_source(values, source),
        "export_options": dict(options),
        "parameters": parameter_table(model),
        "artifacts": dict(artifacts),
        "files": file_table(staging, artifacts),
    }
