"""Run the exported ONNX model with ONNX Runtime, optionally with swapped-in experts.

    model = OnnxInference("artifacts/")                                  # experts from the files
    model = OnnxInference("artifacts/", experts={name: tensor, ...})     # experts replaced at load
    logits = model.logits(input_ids)                       # (batch, seq) -> (batch, seq, vocab)
    next_logits = model.next_token_logits(input_ids)       # a generation prefill: (batch, vocab)

Replacing experts at load time uses `SessionOptions.add_initializer(initializer, OrtValue)` for
every initializer the manifest maps the parameter to, **with ORT's ConstantFolding optimizer
disabled**: otherwise ORT folds computations on the initializer (e.g. `Transpose(B)`) using the
value from the file while building the session, and the override is silently ignored. Without
overrides the files' own values are used and all optimizers stay on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.artifacts.errors import ArtifactInputError, ManifestVersionError
from edge_runtime.artifacts.executorch_open import open_checked
from edge_runtime.artifacts.inputs import check_experts, check_logit_positions, check_token_ids, last_position
from edge_runtime.artifacts.manifest import (
    KIND_ONNX,
    ONNX_EXPORT_ID_KEY,
    ONNX_FORMAT_VERSION_KEY,
    check_program_identity,
)

DISABLED_WITH_OVERRIDES = ["ConstantFolding"]


def session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every CastLike it cannot fold
    if threads:
        options.intra_op_num_threads = threads
    return options


class OnnxInference:
    """A verified ONNX Runtime session of the exported model."""

    def __init__(self, directory: str | Path, artifact: str = "onnx", *, experts: Mapping[str, Any] | None = None,
                 verify: bool = True, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.manifest, self.entry = open_checked(directory, artifact, KIND_ONNX, verify, None)
        self.artifact = artifact
        options = session_options(threads)
        self._overrides: list[Any] = []  # OrtValues must outlive the session creation
        disabled: list[str] = []
        if experts:
            arrays = check_experts(experts, self.manifest.parameters(), self.manifest.pluggable(artifact))
            for name, array in arrays.items():
                for ref in self.manifest.pluggable(artifact)[name]:
                    value = ort.OrtValue.ortvalue_from_numpy(array)
                    options.add_initializer(ref["key"], value)
                    self._overrides.append(value)
            disabled = list(DISABLED_WITH_OVERRIDES)
        self.session = ort.InferenceSession(str(self.manifest.path(artifact, "model")), options,
                                            providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            version, export_id = int(meta[ONNX_FORMAT_VERSION_KEY]), int(meta[ONNX_EXPORT_ID_KEY])
        except (KeyError, ValueError):
            raise ManifestVersionError(f"{artifact}: the ONNX model carries no comigs identity metadata; it was not "
                                       "written by `comigs export`. Re-export it.") from None
        check_program_identity(self.manifest, artifact, version, export_id)
        self.vocab_size = int(self.manifest.data["base_model"]["vocab_size"])

    def logits(self, input_ids: torch.Tensor, logit_positions: Any = None) -> torch.Tensor:
        """Logits at `logit_positions` (default: every position) -> (batch, positions, vocab)."""
        dims = self.entry["dims"]
        ids = check_token_ids(input_ids, what=f"{self.artifact} input_ids", batch=None,
                              seq_min=dims["seq"]["min"], seq_max=dims["seq"]["max"], vocab_size=self.vocab_size)
        if ids.shape[0] > dims["batch"]["max"]:
            raise ArtifactInputError(f"{self.artifact}: batch {ids.shape[0]} exceeds the exported maximum "
                                     f"{dims['batch']['max']}.")
        positions = check_logit_positions(logit_positions, what=f"{self.artifact} logit_positions",
                                          seq_len=ids.shape[1], max_positions=dims["positions"]["max"])
        feeds = {"input_ids": np.ascontiguousarray(ids.numpy()), "logit_positions": positions.numpy()}
        (logits,) = self.session.run(["logits"], feeds)
        return torch.from_numpy(logits)

    def next_token_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prefill of generation: logits after the last token only -> (batch, vocab)."""
        return self.logits(input_ids, last_position(input_ids))[:, 0]

    def close(self) -> None:
        self.session = None
        self._overrides.clear()

    def __enter__(self) -> OnnxInference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
