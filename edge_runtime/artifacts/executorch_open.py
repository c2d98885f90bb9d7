"""Opening an ExecuTorch artifact safely: hashes, memory budget, optional expert overrides, identity.

The order matters: nothing reaches the ExecuTorch runtime before the manifest hashes of the
program and its data file are verified and the memory budget is checked; right after loading,
the program's embedded format version and export id must match the manifest.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_runtime.artifacts import ptd
from edge_runtime.artifacts.errors import ManifestError, ManifestVersionError, MemoryBudgetError
from edge_runtime.artifacts.inputs import check_experts
from edge_runtime.artifacts.manifest import (
    ET_EXPORT_ID_METHOD,
    ET_FORMAT_VERSION_METHOD,
    Manifest,
    check_program_identity,
)


def memory_requirement(entry: Mapping[str, Any]) -> int:
    """Bytes a device needs for an ExecuTorch artifact: activation arena + program + data file."""
    memory = entry.get("memory", {})
    return int(memory.get("arena_bytes", 0)) + int(memory.get("program_bytes", 0)) + int(memory.get("data_bytes", 0))


def check_memory_budget(entry: Mapping[str, Any], budget_bytes: int | None, artifact: str) -> None:
    if budget_bytes is None:
        return
    needed = memory_requirement(entry)
    if needed > budget_bytes:
        arena = entry.get("memory", {}).get("arena_bytes", 0)
        raise MemoryBudgetError(
            f"{artifact} needs about {needed / 2**20:.1f} MiB (activation arena {arena / 2**20:.1f} MiB + program + "
            f"weights), more than the budget of {budget_bytes / 2**20:.1f} MiB; free memory or re-export with a "
            "smaller sequence length / batch.")


def open_checked(directory: str | Path, artifact: str, kind: str, verify: bool,
                 memory_budget_bytes: int | None) -> tuple[Manifest, dict[str, Any]]:
    manifest = Manifest.load(directory)
    entry = manifest.artifact(artifact)
    if entry.get("kind") != kind:
        raise ManifestError(f"{artifact} is a {entry.get('kind')!r} artifact, not {kind!r}.")
    if verify:
        manifest.verify([artifact])
    check_memory_budget(entry, memory_budget_bytes, artifact)
    return manifest, entry


def patched_data_file(manifest: Manifest, artifact: str, experts: Mapping[str, Any],
                      workdir: tempfile.TemporaryDirectory) -> Path:
    """A copy of the artifact's .ptd with `experts` written in (the artifact files stay untouched)."""
    arrays = check_experts(experts, manifest.parameters(), manifest.pluggable(artifact))
    source = manifest.path(artifact, "data")
    data, index = ptd.read_file(source)
    keymap = manifest.pluggable(artifact)
    values = {ref["key"]: ptd.ref_bytes(arrays[name], ref) for name in arrays for ref in keymap[name]}
    target = Path(workdir.name) / source.name
    target.write_bytes(ptd.patch(data, index, values, str(source)))
    return target


def check_identity(manifest: Manifest, artifact: str, method_names: set[str],
                   run_constant: Callable[[str], Any]) -> None:
    """The program's embedded format version and export id must be the manifest's."""
    if not {ET_FORMAT_VERSION_METHOD, ET_EXPORT_ID_METHOD} <= method_names:
        raise ManifestVersionError(f"{artifact}: the program carries no comigs identity methods; it was not written "
                                   "by `comigs export` (or by an incompatible version). Re-export it.")
    check_program_identity(manifest, artifact, run_constant(ET_FORMAT_VERSION_METHOD),
                           run_constant(ET_EXPORT_ID_METHOD))
