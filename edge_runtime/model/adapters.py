"""A device's adapters on disk: generalists, specialists and router as safetensors plus a JSON config.

Layout of an adapter directory:

    adapter_config.json        format version, CoMiGS config, base model identity, file hashes
    generalist.safetensors     shared experts (what the coordinator averages)
    specialist.safetensors     private experts        (absent when the device has none)
    router.safetensors         private routers        (absent when E = 1)

Tensors keep their full parameter names, so a file is self-describing and round-trips
bit-exactly. Every file is written atomically; the config, written last, records each file's
sha256, so a crash mid-save is detected on load instead of silently mixing old and new files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from edge_runtime import roles
from edge_runtime.model.config import CoMiGSConfig
from edge_runtime.model.inject import comigs_config
from edge_runtime.storage import atomic_write_bytes, sha256_file

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
ROLE_FILES = {
    roles.Role.GENERALIST: "generalist.safetensors",
    roles.Role.SPECIALIST: "specialist.safetensors",
    roles.Role.ROUTER: "router.safetensors",
}
# Expert-layout fields that decide each role's tensor shapes; a mismatch means they cannot fit.
_SHAPE_FIELDS = {
    roles.Role.GENERALIST: ("n_generalists", "rank", "attention_lora"),
    roles.Role.SPECIALIST: ("n_specialists", "rank"),
    roles.Role.ROUTER: ("n_experts",),
}


def base_identity(model: nn.Module) -> dict[str, Any]:
    """What the adapters were trained on top of (checked on load)."""
    cfg = model.config
    info = dict(getattr(model, "comigs_base_info", {}))
    info.update(model_type=cfg.model_type, vocab_size=cfg.vocab_size,
                num_layers=getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)),
                hidden_size=getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)))
    return info


def save_adapters(model: nn.Module, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for role, filename in ROLE_FILES.items():
        tensors = roles.state_by_role(model, role)
        path = directory / filename
        if not tensors:
            path.unlink(missing_ok=True)
            continue
        atomic_write_bytes(path, save_safetensors_bytes(tensors, metadata={"role": role.value}))
        files[role.value] = {"file": filename, "sha256": sha256_file(path), "tensors": len(tensors)}
    config = {
        "format_version": FORMAT_VERSION,
        "comigs": comigs_config(model).to_dict(),
        "base_model": base_identity(model),
        "files": files,
        "metadata": metadata or {},
    }
    atomic_write_bytes(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not an adapter directory "
                                "(save one with `comigs train --out DIR`).")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise roles.AdapterMismatchError(f"{path} is not valid JSON ({exc}); the file is corrupt.") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise roles.AdapterMismatchError(
            f"{path}: adapter format version {config.get('format_version')!r} is not supported "
            f"(this comigs-edge reads version {FORMAT_VERSION}).")
    return config


def load_role_tensors(directory: str | Path, role: roles.Role, config: dict[str, Any] | None = None
                      ) -> dict[str, torch.Tensor]:
    """The tensors of one role from an adapter directory, after verifying the file's hash."""
    directory = Path(directory)
    config = config or read_adapter_config(directory)
    entry = config["files"].get(role.value)
    if entry is None:
        return {}
    path = directory / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in {CONFIG_FILE} but missing.")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise roles.AdapterMismatchError(f"{path}: sha256 does not match {CONFIG_FILE}; the file is "
                                         "corrupt or from another save. Re-save or restore the adapters.")
    return load_safetensors_bytes(data)


def load_adapters(model: nn.Module, directory: str | Path,
                  which: tuple[roles.Role, ...] = tuple(ROLE_FILES)) -> dict[str, Any]:
    """Load the adapters of roles `which` into an injected model; returns the adapter config."""
    config = read_adapter_config(directory)
    saved = CoMiGSConfig.from_dict(config["comigs"])
    current = comigs_config(model)
    for role in which:
        for field in _SHAPE_FIELDS[role]:
            if getattr(saved, field) != getattr(current, field):
                raise roles.AdapterMismatchError(
                    f"{role.value} adapters in {directory} have {field}={getattr(saved, field)!r} but "
                    f"the model has {getattr(current, field)!r}; inject the model with the adapters' "
                    "config (CoMiGSConfig.from_dict(read_adapter_config(dir)['comigs'])).")
        roles.load_state_by_role(model, load_role_tensors(directory, role, config), role)
    return config
