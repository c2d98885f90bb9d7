"""Which tensors are pluggable, and how to find each of them again inside an exported artifact.

Pluggable = every parameter whose role (asked of `edge_runtime.roles`, never guessed from the
name here) is generalist, specialist or router: new generalists arrive every round, specialists
and routers change on the device. They must live outside the program, under keys we can map
back to parameter names:

- ExecuTorch portable: the `.ptd` key is the program FQN (`model.` + parameter name).
- ExecuTorch XNNPACK: tensors the delegate consumes as static weights are stored under the
  sha256 of the bytes they were exported with; identical tensors (all-zero LoRA B at init!)
  would collapse into one key and could no longer be replaced separately.
- ONNX: initializer names are the program FQNs.

So every export traces the model with *distinct placeholder values* in the pluggable
parameters (seeded random, checked unique), builds the name -> keys map from the placeholders'
names and hashes, and only then writes the real values into the data files, through the same
code path a later swap uses. The export self-check then runs the programs with yet another set
of random experts: a tensor that was silently embedded in a program (constant-folded, packed
into a delegate blob) would keep its placeholder value and fail that check.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from edge_runtime import roles
from edge_runtime.artifacts.ptd import PtdEntry
from export.errors import ExportError
from export.prepare import PROGRAM_PREFIX

PLUGGABLE_ROLES = (roles.Role.GENERALIST, roles.Role.SPECIALIST, roles.Role.ROUTER)


def pluggable_names(model: nn.Module) -> list[str]:
    """Model parameter names of every generalist, specialist and router tensor, in model order."""
    return [name for name, _ in roles.named_parameters_by_role(model, *PLUGGABLE_ROLES)]


def pluggable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return roles.state_by_role(model, *PLUGGABLE_ROLES)


def random_pluggables(model: nn.Module, seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Seeded random values for every pluggable tensor, all distinct (byte-wise)."""
    generator = torch.Generator().manual_seed(seed)
    values: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for name, param in roles.named_parameters_by_role(model, *PLUGGABLE_ROLES):
        value = (torch.randn(param.shape, generator=generator) * std).to(param.dtype)
        digest = sha256_of(value)
        if digest in seen:  # astronomically unlikely; never export two equal placeholders
            raise ExportError(f"placeholder for {name} collides with another one; use another --seed.")
        seen.add(digest)
        values[name] = value
    return values


def sha256_of(tensor: torch.Tensor) -> str:
    """The key XNNPACK gives a delegated constant: sha256 of its float32 C-order bytes."""
    return hashlib.sha256(tensor.detach().contiguous().float().numpy().tobytes()).hexdigest()


@contextlib.contextmanager
def values_installed(model: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily copy `values` into the model's parameters; the old values come back afterwards."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in values}
    try:
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def ptd_key_map(index: Mapping[str, PtdEntry], placeholders: Mapping[str, torch.Tensor], artifact: str,
                derived: Mapping[str, tuple[str, int]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Parameter name -> refs `{"key": ptd key}` (whole tensor) or `{"key", "index"}` (slice `P[index]`).

    `derived` maps per-expert tensors made by `split_expert_selects` (model names) to their
    (parameter, index). Keys are FQNs (non-delegated constants) or the sha256 of the placeholder
    bytes (XNNPACK). Refuses (ExportError) anything that would make a swap incomplete or
    ambiguous: a pluggable tensor not fully covered (part of it was embedded in the program), a
    key that is no pluggable tensor, two refs sharing one data segment, or a size mismatch.
    """
    derived = dict(derived or {})
    by_name: dict[str, tuple[str, int | None]] = {PROGRAM_PREFIX + n: (n, None) for n in placeholders}
    by_name.update({PROGRAM_PREFIX + d: ref for d, ref in derived.items()})
    by_hash: dict[str, tuple[str, int | None]] = {sha256_of(t): (n, None) for n, t in placeholders.items()}
    for name, i in derived.values():
        by_hash[sha256_of(placeholders[name][i])] = (name, i)
    mapping: dict[str, list[dict[str, Any]]] = {name: [] for name in placeholders}
    owner_of_segment: dict[int, str] = {}
    for key, entry in index.items():
        ref = by_name.get(key) or by_hash.get(key)
        if ref is None:
            raise ExportError(f"{artifact}: the data file holds {key!r}, which is no pluggable tensor; the "
                              "exporter tagged something it should not have.")
        name, i = ref
        part = placeholders[name] if i is None else placeholders[name][i]
        if entry.size != part.numel() * 4:
            raise ExportError(f"{artifact}: {key!r} ({name}) holds {entry.size} bytes, expected {part.numel() * 4}.")
        label = f"{name}[{i}]" if i is not None else name
        if owner_of_segment.setdefault(entry.segment, label) != label:
            raise ExportError(f"{artifact}: {label} and {owner_of_segment[entry.segment]} share one data segment; "
                              "they could not be swapped separately.")
        mapping[name].append({"key": key} if i is None else {"key": key, "index": i})
    for name, refs in mapping.items():
        whole = any("index" not in r for r in refs)
        slices = {r["index"] for r in refs if "index" in r}
        if not whole and slices != set(range(placeholders[name].shape[0] if placeholders[name].dim() else 0)):
            raise ExportError(f"{artifact}: {name} is not (fully) in the data file: it was embedded in the program "
                              "and could not be swapped. This exporter does not support this model/backend "
                              "combination.")
    return {name: sorted(refs, key=lambda r: (r.get("index", -1), r["key"])) for name, refs in mapping.items()}
