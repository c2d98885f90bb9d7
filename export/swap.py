"""`comigs export swap-experts`: put adapters (as the core model saves them) into exported artifacts.

Accepts either an adapter directory written by `save_adapters` (adapter_config.json plus
generalist/specialist/router safetensors, each hash-checked on read) or a single `.safetensors`
file of full parameter names. Before anything is written, the adapters must fit the export: the
same expert layout (for directories: the config's shape-deciding fields), the same base model
identity, only pluggable tensor names, complete roles, exact shapes, finite floats. The atomic
multi-artifact rewrite itself is `edge_runtime.artifacts.swap.swap_experts`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from edge_runtime import roles
from edge_runtime.artifacts.errors import ArtifactInputError
from edge_runtime.artifacts.manifest import Manifest
from edge_runtime.artifacts.swap import swap_experts
from edge_runtime.model.adapters import CONFIG_FILE, ROLE_FILES, load_role_tensors, read_adapter_config

# Fields of the expert layout that decide tensor shapes, per role (as in edge_runtime.model.adapters).
_SHAPE_FIELDS = {
    roles.Role.GENERALIST: ("n_generalists", "rank", "attention_lora"),
    roles.Role.SPECIALIST: ("n_specialists", "rank"),
    roles.Role.ROUTER: ("n_experts",),
}
_BASE_FIELDS = ("model_type", "vocab_size", "num_layers", "hidden_size")


def read_adapters(path: str | Path, wanted: Iterable[roles.Role] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(tensors by parameter name, adapter config or None for a bare .safetensors file)."""
    from safetensors.torch import load_file

    path = Path(path)
    wanted_roles = set(wanted) if wanted is not None else set(ROLE_FILES)
    if path.is_dir():
        config = read_adapter_config(path)
        tensors: dict[str, torch.Tensor] = {}
        for role in ROLE_FILES:
            if role in wanted_roles:
                tensors.update(load_role_tensors(path, role, config))
        return tensors, config
    if path.is_file() and path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ArtifactInputError(f"{path} is not a readable safetensors file ({exc}).") from exc
        return {n: t for n, t in tensors.items() if roles.role_of(n) in wanted_roles}, None
    raise ArtifactInputError(f"--adapters {path}: expected an adapter directory (with {CONFIG_FILE}, as written by "
                             "`comigs train`) or a .safetensors file.")


def check_adapters_fit(manifest: Manifest, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None) -> None:
    """Refuse adapters made for another expert layout or base model (before any tensor check)."""
    if config is None:
        return
    ours, theirs = _with_totals(manifest.data["comigs"]), _with_totals(config.get("comigs", {}))
    present = {roles.role_of(n) for n in tensors}
    for role in present:
        for field in _SHAPE_FIELDS.get(role, ()):
            if theirs.get(field) != ours.get(field):
                raise ArtifactInputError(f"{role.value} adapters have {field}={theirs.get(field)!r}, the export has "
                                         f"{ours.get(field)!r}: they were trained for another expert layout.")
    base, their_base = manifest.data["base_model"], config.get("base_model", {})
    for field in _BASE_FIELDS:
        if field in their_base and their_base[field] != base.get(field):
            raise ArtifactInputError(f"adapters were trained on a base model with {field}={their_base[field]!r}, the "
                                     f"export's base has {base.get(field)!r}.")


def _with_totals(layout: dict[str, Any]) -> dict[str, Any]:
    total = (layout.get("n_generalists") or 0) + (layout.get("n_specialists") or 0)
    return {**layout, "n_experts": total}


def swap_from_adapters(directory: str | Path, adapters: str | Path,
                       wanted: Iterable[roles.Role] | None = None) -> Manifest:
    """Validate `adapters` against the export in `directory` and swap them into every artifact."""
    manifest = Manifest.load(directory)
    tensors, config = read_adapters(adapters, wanted)
    if not tensors:
        raise ArtifactInputError(f"{adapters} holds no generalist, specialist or router tensors"
                                 + (" of the requested roles" if wanted is not None else "") + ".")
    check_adapters_fit(manifest, tensors, config)
    source = {"source": str(Path(adapters).absolute())}
    if config is not None:
        source["adapter_metadata"] = config.get("metadata", {})
    return swap_experts(directory, tensors, source=source)
