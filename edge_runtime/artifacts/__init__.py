"""Device-side access to exported artifacts: verify the manifest, run the programs, swap experts.

Importing this package is cheap: ExecuTorch and ONNX Runtime are imported when a loader is
created. Public API:

- `Manifest.load(dir)`, `Manifest.verify(...)`: the artifact directory's description and hashes
- `ExecuTorchInference(dir, "pte" | "pte-xnnpack")`: run an inference program (`logits(ids, logit_positions=None)`:
  logits at the positions asked for, all by default; `next_token_logits(ids)`:
  a generation prefill, the LM head on the last position only; the same on `OnnxInference`)
- `ExecuTorchTrainer(dir, "pte-train")`: bi-level training steps with AdamW over the program's weights
- `OnnxInference(dir)`: ONNX Runtime session, optionally with experts swapped in at load
- `swap_experts(dir, tensors)`: atomically rewrite the experts of every artifact
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_runtime.artifacts.errors import (
    ArtifactError,
    ArtifactInputError,
    ArtifactIntegrityError,
    ManifestError,
    ManifestVersionError,
    MemoryBudgetError,
)
from edge_runtime.artifacts.manifest import MANIFEST_FILE, Manifest

if TYPE_CHECKING:
    from edge_runtime.artifacts.executorch_inference import ExecuTorchInference
    from edge_runtime.artifacts.executorch_training import ExecuTorchTrainer, OptimizerSettings
    from edge_runtime.artifacts.onnx_inference import OnnxInference
    from edge_runtime.artifacts.swap import swap_experts

_LAZY = {
    "ExecuTorchInference": "edge_runtime.artifacts.executorch_inference",
    "ExecuTorchTrainer": "edge_runtime.artifacts.executorch_training",
    "OptimizerSettings": "edge_runtime.artifacts.executorch_training",
    "OnnxInference": "edge_runtime.artifacts.onnx_inference",
    "swap_experts": "edge_runtime.artifacts.swap",
}

__all__ = [
    "MANIFEST_FILE", "ArtifactError", "ArtifactInputError", "ArtifactIntegrityError", "ExecuTorchInference",
    "ExecuTorchTrainer", "Manifest", "ManifestError", "ManifestVersionError", "MemoryBudgetError",
    "OnnxInference", "OptimizerSettings", "swap_experts",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
