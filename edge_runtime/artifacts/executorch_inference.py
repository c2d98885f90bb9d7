"""Run an exported ExecuTorch inference program (portable or XNNPACK) on a device.

    model = ExecuTorchInference("artifacts/", "pte-xnnpack")
    logits = model.logits(input_ids)          # (batch, seq) int64 -> (batch, seq, vocab) float32
    logits = model.logits(input_ids, [7, 9])  # logits at positions 7 and 9 only: (batch, 2, vocab)
    next_logits = model.next_token_logits(input_ids)  # a generation prefill: (batch, vocab)

The program's experts come from its `.ptd` (whatever the last `swap-experts` wrote); `experts=`
runs it with other expert tensors without touching the files (a patched copy of the `.ptd` in a
temporary directory), e.g. to evaluate freshly averaged generalists before committing them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edge_runtime.artifacts.executorch_open import check_identity, open_checked, patched_data_file
from edge_runtime.artifacts.executorch_runtime import InferenceProgram
from edge_runtime.artifacts.inputs import check_logit_positions, check_token_ids, last_position
from edge_runtime.artifacts.manifest import KIND_ET_INFERENCE


class ExecuTorchInference:
    """A verified, loaded inference program. Not thread-safe (one ExecuTorch method instance)."""

    def __init__(self, directory: str | Path, artifact: str = "pte-xnnpack", *,
                 experts: Mapping[str, Any] | None = None, verify: bool = True,
                 memory_budget_bytes: int | None = None) -> None:
        self.manifest, self.entry = open_checked(directory, artifact, KIND_ET_INFERENCE, verify, memory_budget_bytes)
        self.artifact = artifact
        self._workdir: tempfile.TemporaryDirectory | None = None
        data_path = self.manifest.path(artifact, "data")
        if experts:
            self._workdir = tempfile.TemporaryDirectory(prefix="comigs-experts-")
            data_path = patched_data_file(self.manifest, artifact, experts, self._workdir)
        program = InferenceProgram(self.manifest.path(artifact, "program"), data_path,
                                   method=self.entry.get("method", "forward"))
        check_identity(self.manifest, artifact, program.method_names, lambda name: program.run([], name)[0])
        self._program: InferenceProgram | None = program
        self.vocab_size = int(self.manifest.data["base_model"]["vocab_size"])

    def logits(self, input_ids: torch.Tensor, logit_positions: Any = None) -> torch.Tensor:
        """Logits at `logit_positions` (default: every position) -> (batch, positions, vocab)."""
        dims = self.entry["dims"]
        ids = check_token_ids(input_ids, what=f"{self.artifact} input_ids", batch=self.entry["batch"],
                              seq_min=dims["seq"]["min"], seq_max=dims["seq"]["max"], vocab_size=self.vocab_size)
        positions = check_logit_positions(logit_positions, what=f"{self.artifact} logit_positions",
                                          seq_len=ids.shape[1], max_positions=dims["positions"]["max"])
        if self._program is None:
            raise RuntimeError(f"{self.artifact}: the program is closed.")
        return self._program.run([ids, positions])[0]

    def next_token_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prefill of generation: logits after the last token only -> (batch, vocab)."""
        return self.logits(input_ids, last_position(input_ids))[:, 0]

    def close(self) -> None:
        self._program = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> ExecuTorchInference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
