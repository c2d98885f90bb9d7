"""Flat token splits and the batches the trainer and the evaluator draw from them.

A split is one 1-D array of token ids (documents concatenated, as in nanoGPT), stored as a
`.npy` file so the dtype travels with it and large splits are memory-mapped, never read whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """Token data is missing, empty or malformed; the message says which file and what to do."""


class TokenSplit:
    """One split's token ids, sampled as random windows or walked as non-overlapping windows."""

    def __init__(self, tokens: np.ndarray | torch.Tensor, name: str = "tokens") -> None:
        array = tokens.numpy() if isinstance(tokens, torch.Tensor) else tokens
        if array.ndim != 1:
            raise DataError(f"{name}: token array must be 1-D, got shape {array.shape}.")
        if not np.issubdtype(array.dtype, np.integer):
            raise DataError(f"{name}: token ids must be integers, got dtype {array.dtype}.")
        if array.size < 2:
            raise DataError(f"{name}: needs at least 2 tokens, has {array.size}.")
        self.tokens, self.name = array, name

    @classmethod
    def load(cls, path: str | Path) -> TokenSplit:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"token file {path} does not exist; prepare data with `comigs data prepare` "
                            "or point --data at a directory holding train.npy/valid.npy/test.npy.")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path} is not a readable .npy token file: {exc}") from exc
        return cls(array, name=str(path))

    def __len__(self) -> int:
        return int(self.tokens.size)

    def check_vocab(self, vocab_size: int) -> None:
        top = int(self.tokens.max())
        if top >= vocab_size or int(self.tokens.min()) < 0:
            raise DataError(f"{self.name}: token id {top} is outside the model's vocabulary of "
                            f"{vocab_size}; the data was tokenised for another model.")

    def sample(self, batch_size: int, seq_len: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` random windows: inputs and next-token targets, each (batch, seq_len)."""
        if len(self) < seq_len + 1:
            raise DataError(f"{self.name}: {len(self)} tokens are fewer than one window of "
                            f"{seq_len + 1}; use a shorter --seq-len or more data.")
        starts = torch.randint(0, len(self) - seq_len, (batch_size,), generator=generator).tolist()
        windows = np.stack([np.asarray(self.tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        batch = torch.from_numpy(windows)
        return batch[:, :-1], batch[:, 1:]

    def windows(self, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every token once, in non-overlapping windows of `seq_len` (the last may be shorter),
        batched by `batch_size` windows of equal length."""
        n_targets = len(self) - 1
        starts = list(range(0, n_targets, seq_len))
        full = [s for s in starts if s + seq_len <= n_targets]
        for i in range(0, len(full), batch_size):
            rows = [np.asarray(self.tokens[s:s + seq_len + 1], dtype=np.int64) for s in full[i:i + batch_size]]
            batch = torch.from_numpy(np.stack(rows))
            yield batch[:, :-1], batch[:, 1:]
        if len(full) < len(starts):  # the tail shorter than a window
            tail = torch.from_numpy(np.array(self.tokens[starts[-1]:], dtype=np.int64))[None]
            yield tail[:, :-1], tail[:, 1:]


def load_splits(directory: str | Path, names: tuple[str, ...] = SPLITS) -> dict[str, TokenSplit]:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist.")
    return {name: TokenSplit.load(directory / f"{name}.npy") for name in names}
