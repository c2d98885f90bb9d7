"""Read the expert and router tensors currently stored in an ExecuTorch artifact's `.ptd`.

The inverse of a swap: what a device holds right now (e.g. to rebuild an eager twin, to send
its generalists to the coordinator, or to check an export), by parameter name.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.artifacts import ptd
from edge_runtime.artifacts.errors import ManifestError
from edge_runtime.artifacts.manifest import KIND_ET_INFERENCE, KIND_ET_TRAINING, Manifest


def read_experts(manifest: Manifest, artifact: str) -> dict[str, np.ndarray]:
    """Parameter name -> float32 array for every pluggable tensor of an ExecuTorch artifact."""
    entry = manifest.artifact(artifact)
    if entry["kind"] not in (KIND_ET_INFERENCE, KIND_ET_TRAINING):
        raise ManifestError(f"{artifact} is not an ExecuTorch artifact; read experts from pte, pte-xnnpack or "
                            "pte-train.")
    data, index = ptd.read_file(manifest.path(artifact, "data"))
    params = manifest.parameters()
    out: dict[str, np.ndarray] = {}
    for name, refs in manifest.pluggable(artifact).items():
        shape = tuple(params[name]["shape"])
        value = np.empty(shape, dtype=np.float32)
        for ref in refs:
            if "index" in ref:
                value[ref["index"]] = ptd.read_tensor(data, index[ref["key"]], shape[1:])
            else:
                value[...] = ptd.read_tensor(data, index[ref["key"]], shape)
        out[name] = value
    return out
