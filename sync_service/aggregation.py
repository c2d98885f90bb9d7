"""Aggregation strategies: how a round's generalist deltas become one averaged delta.

Pure numpy over named arrays, shared by the coordinator and the in-process simulation. Every strategy is a
*streaming* weighted mean: `add` folds one update into a float64 running sum and forgets it, so memory is
O(model) whatever the number of devices (the coordinator feeds it lazily read upload files, one tensor at
a time). float64 accumulation keeps the result independent of how many devices there are to within
float32 rounding; it is bit-for-bit deterministic for a given order of `add` calls, which is why the
coordinator always adds uploads sorted by device id.

Strategies:
* ``fedavg`` (default): weights are the devices' training sample counts (McMahan et al.);
* ``uniform``: every device weighs 1, the plain mean of the CoMiGS paper.

The published generalist is ``previous + result()`` (float32).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

STRATEGIES = ("fedavg", "uniform")
DEFAULT_STRATEGY = "fedavg"

ManifestShapes = Mapping[str, tuple[tuple[int, ...], str]]


class Aggregator:
    """A running weighted mean of deltas over the tensors of a manifest.

    Subclasses choose the weight of an update from its sample count. Inputs are validated (names,
    shapes, finiteness) because the simulation calls this directly, without the server's validation.
    """

    strategy = "base"

    def __init__(self, manifest: ManifestShapes) -> None:
        if not manifest:
            raise ValueError("an aggregator needs a non-empty manifest")
        self._shapes = {name: tuple(int(d) for d in spec[0]) for name, spec in manifest.items()}
        self._sums: dict[str, np.ndarray] | None = None
        self._total_weight = 0.0
        self._count = 0
        self._broken = False

    def _check_usable(self) -> None:
        if self._broken:
            raise RuntimeError("this aggregator saw an invalid update half-way through; start a new one")

    def weight(self, num_samples: int) -> float:
        raise NotImplementedError

    @property
    def count(self) -> int:
        """Updates added so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def add(self, tensors: Mapping[str, np.ndarray], num_samples: int) -> None:
        """Fold one device's delta in. `tensors` may be lazy: each value is read exactly once.

        Raises ValueError naming the first bad tensor. If that happens after earlier updates were added,
        the aggregator becomes unusable (validate untrusted input before adding it).
        """
        self._check_usable()
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        names = set(tensors.keys())
        expected = set(self._shapes)
        if names != expected:
            unknown, missing = sorted(names - expected), sorted(expected - names)
            if unknown:
                raise ValueError(f"unknown tensor {unknown[0]!r} (not in the manifest)")
            raise ValueError(f"missing tensor {missing[0]!r}")
        weight = self.weight(int(num_samples))
        first = self._sums is None
        sums = self._sums if self._sums is not None else {}
        try:
            for name in sorted(self._shapes):
                value = np.asarray(tensors[name])
                if tuple(value.shape) != self._shapes[name]:
                    raise ValueError(
                        f"tensor {name!r} has shape {list(value.shape)}, expected {list(self._shapes[name])}"
                    )
                if not np.all(np.isfinite(value)):
                    raise ValueError(f"tensor {name!r} has non-finite values")
                contribution = np.multiply(value, weight, dtype=np.float64)
                if first:
                    sums[name] = contribution
                else:
                    sums[name] += contribution
        except ValueError:
            if not first:
                # Some tensors of this update are already in the sums and cannot be taken out bit-exactly
                # (float rounding), so the aggregator refuses further use rather than return a wrong mean.
                self._broken = True
            raise
        self._sums = sums
        self._total_weight += weight
        self._count += 1

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean delta as float32 arrays (the aggregator stays usable)."""
        self._check_usable()
        if self._sums is None or self._count == 0:
            raise ValueError("no updates were added; there is nothing to average")
        total = self._total_weight
        return {name: (self._sums[name] / total).astype(np.float32) for name in sorted(self._sums)}


class FedAvgAggregator(Aggregator):
    """Weights proportional to the number of training samples behind each delta."""

    strategy = "fedavg"

    def weight(self, num_samples: int) -> float:
        return float(num_samples)


class UniformAggregator(Aggregator):
    """Every device weighs the same (the CoMiGS paper's 1/N mean)."""

    strategy = "uniform"

    def weight(self, num_samples: int) -> float:
        return 1.0


_STRATEGY_CLASSES: dict[str, type[Aggregator]] = {"fedavg": FedAvgAggregator, "uniform": UniformAggregator}


def make_aggregator(strategy: str, manifest: ManifestShapes) -> Aggregator:
    """A fresh streaming aggregator for `strategy` ("fedavg" or "uniform") over `manifest`.

    `manifest` maps tensor names to (shape, dtype), e.g. `Manifest.as_shapes()`.
    """
    try:
        cls = _STRATEGY_CLASSES[strategy]
    except KeyError:
        raise ValueError(f"unknown aggregation strategy {strategy!r}; choose one of {STRATEGIES}") from None
    return cls(manifest)


class TensorwiseMean(Mapping[str, np.ndarray]):
    """The same weighted mean as `make_aggregator(...)`, computed one tensor at a time, on access.

    `result[name]` reads `name` from every update (in the given order), accumulates it in float64 exactly
    as `Aggregator.add` would, and returns the float32 mean; nothing else is kept. Peak memory is one
    tensor instead of the aggregator's float64 copy of the whole model, which is what the coordinator
    uses when it writes the new generalist tensor by tensor. The result is bit-identical to
    `Aggregator.result()` for the same updates in the same order.
    """

    def __init__(
        self, strategy: str, manifest: ManifestShapes, updates: Sequence[tuple[Mapping[str, np.ndarray], int]]
    ) -> None:
        self._reference = make_aggregator(strategy, manifest)  # validates strategy and manifest
        if not updates:
            raise ValueError("no updates were added; there is nothing to average")
        for tensors, num_samples in updates:
            if (
                isinstance(num_samples, bool)
                or not isinstance(num_samples, (int, np.integer))
                or num_samples < 1
            ):
                raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
            names = set(tensors.keys())
            if names != set(self._reference._shapes):
                unknown = sorted(names - set(self._reference._shapes))
                missing = sorted(set(self._reference._shapes) - names)
                raise ValueError(
                    f"unknown tensor {unknown[0]!r} (not in the manifest)"
                    if unknown
                    else f"missing tensor {missing[0]!r}"
                )
        self._updates = list(updates)
        self._weights = [self._reference.weight(int(n)) for _, n in self._updates]
        self._total = 0.0
        for weight in self._weights:
            self._total += weight

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self._reference._shapes[name]
        total: np.ndarray | None = None
        for (tensors, _), weight in zip(self._updates, self._weights, strict=True):
            value = np.asarray(tensors[name])
            if tuple(value.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {list(value.shape)}, expected {list(shape)}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"tensor {name!r} has non-finite values")
            contribution = np.multiply(value, weight, dtype=np.float64)
            if total is None:
                total = contribution
            else:
                total += contribution
        assert total is not None
        return (total / self._total).astype(np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._reference._shapes))

    def __len__(self) -> int:
        return len(self._reference._shapes)


def aggregate(
    strategy: str, updates: Sequence[tuple[Mapping[str, np.ndarray], int]]
) -> dict[str, np.ndarray]:
    """Average `(tensors, num_samples)` updates in the given order; the manifest is the first update's."""
    if not updates:
        raise ValueError("no updates to aggregate")
    first = updates[0][0]
    manifest = {name: (tuple(np.shape(first[name])), "float32") for name in first}
    aggregator = make_aggregator(strategy, manifest)
    for tensors, num_samples in updates:
        aggregator.add(tensors, num_samples)
    return aggregator.result()
