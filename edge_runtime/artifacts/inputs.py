"""Check token ids and expert tensors against what an artifact was exported for, before running it.

ExecuTorch and ONNX Runtime fail on a wrong shape with an opaque native error (or, for an
out-of-range token id in an embedding, read out of bounds); the manifest knows the exported
shapes and the vocabulary, so we say precisely what does not fit instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from edge_runtime.artifacts.errors import ArtifactInputError


def check_token_ids(ids: torch.Tensor, *, what: str, batch: int | None, seq_min: int, seq_max: int,
                    vocab_size: int) -> torch.Tensor:
    """int64 (batch, seq) ids within the exported ranges; returns a contiguous int64 tensor."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(np.asarray(ids))
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ArtifactInputError(f"{what} must be integer token ids, got dtype {ids.dtype}.")
    if ids.dim() != 2:
        raise ArtifactInputError(f"{what} must have shape (batch, seq), got {tuple(ids.shape)}.")
    if batch is not None and ids.shape[0] != batch:
        raise ArtifactInputError(f"{what}: the program was exported for batch {batch}, got {ids.shape[0]}; "
                                 "re-export with another --batch or split the input.")
    if not seq_min <= ids.shape[1] <= seq_max:
        raise ArtifactInputError(f"{what}: sequence length {ids.shape[1]} is outside the exported range "
                                 f"[{seq_min}, {seq_max}].")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ArtifactInputError(f"{what}: token ids must be in [0, {vocab_size}), got [{int(ids.min())}, "
                                 f"{int(ids.max())}].")
    return ids.to(torch.int64).contiguous()


def check_logit_positions(positions: Any, *, what: str, seq_len: int, max_positions: int) -> torch.Tensor:
    """The positions an inference program computes logits for, as the int64 [P] tensor it takes.

    None means every position (scoring); a generation prefill passes the last one, `[seq_len - 1]`.
    Positions are checked here because an out-of-range index reaches a native gather.
    """
    if positions is None:
        positions = torch.arange(seq_len)
    elif not isinstance(positions, torch.Tensor):
        positions = torch.as_tensor(np.asarray(positions))
    if positions.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ArtifactInputError(f"{what} must be integer sequence positions, got dtype {positions.dtype}.")
    if positions.dim() != 1 or not 1 <= positions.shape[0] <= max_positions:
        raise ArtifactInputError(f"{what} must be a 1-D list of 1 to {max_positions} positions, got shape "
                                 f"{tuple(positions.shape)}.")
    low, high = int(positions.min()), int(positions.max())
    if low < 0 or high >= seq_len:
        raise ArtifactInputError(f"{what}: positions must be in [0, {seq_len}) for a sequence of {seq_len} "
                                 f"tokens, got [{low}, {high}].")
    return positions.to(torch.int64).contiguous()


def last_position(input_ids: Any) -> list[int]:
    """`logit_positions` of a generation prefill: the last token's position only."""
    return [int(torch.as_tensor(input_ids).shape[-1]) - 1]


def check_experts(experts: Mapping[str, Any], parameters: Mapping[str, Mapping[str, Any]],
                  pluggable: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate replacement tensors (name -> tensor/array) against the manifest; float32 arrays out."""
    unknown = sorted(set(experts) - set(pluggable))
    if unknown:
        frozen = [n for n in unknown if n in parameters]
        hint = (" (a frozen base weight: only generalist, specialist and router tensors are pluggable)" if frozen
                else " (no such parameter in this export)")
        raise ArtifactInputError(f"{len(unknown)} tensors cannot be swapped, first {unknown[0]!r}{hint}.")
    out = {}
    for name, value in experts.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        expected = tuple(parameters[name]["shape"])
        if tuple(array.shape) != expected:
            raise ArtifactInputError(f"{name}: shape {tuple(array.shape)} does not match the exported {expected} - "
                                     "made for another rank, expert count or base model.")
        if not np.issubdtype(array.dtype, np.floating):
            raise ArtifactInputError(f"{name}: dtype {array.dtype} is not a floating-point type.")
        if not np.isfinite(array).all():
            raise ArtifactInputError(f"{name}: contains NaN or Inf; refusing to use it.")
        out[name] = np.ascontiguousarray(array, dtype=np.float32)
    return out
