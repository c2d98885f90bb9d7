"""The round manifest: which named tensors the coordinator exchanges, with their shapes and dtypes.

The coordinator never sees the model, only this list. It is fixed when the state directory is
initialised from the initial generalist, and every upload is checked against it, which is what makes
heterogeneous devices (1 expert, 8 experts, ...) safe to average: they all send exactly these tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

#: Logical dtypes a generalist tensor may have. Deltas are averaged in float64 and published as float32.
SUPPORTED_DTYPES = ("float32",)

#: Names travel in JSON headers, SQLite and log lines; keep them printable and bounded.
MAX_NAME_LENGTH = 512


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(self.dtype).itemsize


class Manifest(Mapping[str, TensorSpec]):
    """An immutable, name-sorted mapping name -> TensorSpec.

    Sorted order is the canonical order everywhere (payload layout, validation messages, aggregation),
    so that every process derives the same bytes from the same tensors.
    """

    def __init__(self, specs: Mapping[str, TensorSpec] | list[TensorSpec]) -> None:
        items = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
        by_name: dict[str, TensorSpec] = {}
        for spec in items:
            _check_name(spec.name)
            if spec.name in by_name:
                raise ValueError(f"duplicate tensor name in manifest: {spec.name!r}")
            if spec.dtype not in SUPPORTED_DTYPES:
                raise ValueError(
                    f"tensor {spec.name!r}: dtype {spec.dtype!r} not supported ({SUPPORTED_DTYPES})"
                )
            if any((not isinstance(d, int)) or d < 0 for d in spec.shape):
                raise ValueError(f"tensor {spec.name!r}: bad shape {spec.shape!r}")
            by_name[spec.name] = spec
        if not by_name:
            raise ValueError("a manifest needs at least one tensor")
        self._specs = {name: by_name[name] for name in sorted(by_name)}

    @classmethod
    def from_arrays(cls, tensors: Mapping[str, np.ndarray]) -> Manifest:
        return cls(
            [TensorSpec(name, tuple(int(d) for d in arr.shape), "float32") for name, arr in tensors.items()]
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        return cls([TensorSpec(item["name"], tuple(item["shape"]), item["dtype"]) for item in raw])

    def to_json(self) -> str:
        return json.dumps(
            [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in self._specs.values()],
            separators=(",", ":"),
        )

    def as_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The `{name: (shape, dtype)}` form that `aggregation.make_aggregator` takes."""
        return {name: (spec.shape, spec.dtype) for name, spec in self._specs.items()}

    @property
    def nbytes(self) -> int:
        """Size of one full set of tensors in their logical dtype (one fp32 delta)."""
        return sum(spec.nbytes for spec in self._specs.values())

    def __getitem__(self, name: str) -> TensorSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and self._specs == other._specs

    def __hash__(self) -> int:
        return hash(tuple(self._specs.values()))

    def __repr__(self) -> str:
        return f"Manifest({len(self)} tensors, {self.nbytes} bytes)"


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"tensor name longer than {MAX_NAME_LENGTH} characters: {name[:40]!r}...")
    if not name.isprintable() or ":" in name or name.startswith("__"):
        raise ValueError(f"tensor name {name!r} must be printable, without ':' and not start with '__'")
