"""From documents to token splits: split by document (never inside one), tokenise, write `.npy`.

Splitting by document keeps the validation and test splits honest: no text the model trains
on appears in them. Documents are joined with the tokenizer's EOS token, as in pre-training.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.data.tokens import SPLITS, DataError
from edge_runtime.storage import atomic_write_bytes

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def split_documents(documents: Sequence[str], seed: int = 0,
                    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> dict[str, list[str]]:
    """Shuffle documents with `seed` and cut them into train / valid / test by count.

    Every split gets at least one document when there are three or more.
    """
    docs = [d for d in documents if d.strip()]
    cuts = split_indices(len(docs), seed, fractions)
    return {name: [docs[i] for i in idx] for name, idx in cuts.items()}


def split_indices(n_documents: int, seed: int = 0,
                  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> dict[str, list[int]]:
    """The cut `split_documents` makes, as sorted document indices per split.

    Exposed so callers that keep an id with every document (scenarios) split exactly the same way.
    """
    if n_documents < 3:
        raise DataError(f"need at least 3 non-empty documents to make train/valid/test splits, got {n_documents}.")
    order = list(range(n_documents))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(fractions[1] * n_documents))
    n_test = max(1, round(fractions[2] * n_documents))
    n_train = n_documents - n_valid - n_test
    cuts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid], "test": order[n_train + n_valid:]}
    return {name: sorted(idx) for name, idx in cuts.items()}


def tokenize_documents(tokenizer: Any, documents: Sequence[str]) -> np.ndarray:
    """One flat array of token ids, documents separated by EOS; uint16 when the vocab fits."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    return np.asarray(ids, dtype=dtype)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_splits(directory: str | Path, tokens: dict[str, np.ndarray], manifest: dict[str, Any]) -> Path:
    """Write `<split>.npy` atomically plus `manifest.json` with sizes and sha256 of each file."""
    directory = Path(directory)
    files = {}
    for name in SPLITS:
        data = _npy_bytes(tokens[name])
        atomic_write_bytes(directory / f"{name}.npy", data)
        files[name] = {"tokens": int(tokens[name].size), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {**manifest, "splits": files}
    atomic_write_bytes(directory / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return directory
