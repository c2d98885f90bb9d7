"""Aggregation strategies: exact weighted means, streaming, deterministic, strict about inputs."""

from __future__ import annotations

import numpy as np
import pytest

from sync_service.aggregation import STRATEGIES, TensorwiseMean, aggregate, make_aggregator

from .sync_helpers import make_delta

MANIFEST = {name: (value.shape, "float32") for name, value in make_delta(0).items()}


def test_fedavg_weights_by_samples_exactly() -> None:
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, 6.0], np.float32)}
    result = aggregate("fedavg", [(a, 1), (b, 3)])
    np.testing.assert_array_equal(result["w"], np.array([2.5, 5.0], np.float32))
    assert result["w"].dtype == np.float32


def test_uniform_is_the_plain_mean() -> None:
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, 6.0], np.float32)}
    np.testing.assert_array_equal(
        aggregate("uniform", [(a, 1), (b, 1000)])["w"], np.array([2.0, 4.0], np.float32)
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_streaming_matches_float64_reference_and_is_deterministic(strategy: str) -> None:
    updates = [(make_delta(i, dyadic=False), 10 * (i + 1)) for i in range(6)]
    aggregator = make_aggregator(strategy, MANIFEST)
    for tensors, samples in updates:
        aggregator.add(tensors, samples)
    result = aggregator.result()
    weights = [s if strategy == "fedavg" else 1 for _, s in updates]
    for name in MANIFEST:
        reference = sum(
            np.float64(w) * t[name].astype(np.float64) for (t, _), w in zip(updates, weights, strict=True)
        )
        np.testing.assert_array_equal(result[name], (reference / sum(weights)).astype(np.float32))
    again = aggregate(strategy, updates)
    for name in MANIFEST:
        assert again[name].tobytes() == result[name].tobytes()
    assert aggregator.count == 6 and aggregator.total_weight == sum(weights)


def test_lazy_mappings_are_read_once_per_tensor() -> None:
    reads: list[str] = []

    class Lazy(dict):
        def __getitem__(self, key: str) -> np.ndarray:
            reads.append(key)
            return super().__getitem__(key)

    aggregator = make_aggregator("fedavg", MANIFEST)
    aggregator.add(Lazy(make_delta(1)), 2)
    assert sorted(reads) == sorted(MANIFEST)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(extra=np.zeros(1, np.float32)), "unknown tensor 'extra'"),
        (lambda d: d.pop(sorted(d)[1]), "missing tensor"),
        (lambda d: d.update({sorted(d)[0]: np.zeros((2, 2), np.float32)}), "has shape \\[2, 2\\]"),
        (lambda d: d[sorted(d)[0]].__setitem__((0, 0, 0), np.nan), "non-finite"),
    ],
)
def test_invalid_updates_are_refused_with_the_tensor_name(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    delta = make_delta(2)
    mutate(delta)
    with pytest.raises(ValueError, match=message):
        make_aggregator("fedavg", MANIFEST).add(delta, 1)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown aggregation strategy"):
        make_aggregator("median", MANIFEST)
    with pytest.raises(ValueError, match="num_samples"):
        make_aggregator("fedavg", MANIFEST).add(make_delta(0), 0)
    with pytest.raises(ValueError, match="nothing to average"):
        make_aggregator("fedavg", MANIFEST).result()


def test_a_half_added_update_poisons_the_aggregator() -> None:
    aggregator = make_aggregator("fedavg", MANIFEST)
    aggregator.add(make_delta(0), 1)
    bad = make_delta(1)
    bad[sorted(bad)[-1]][0, 0, 0] = np.inf  # the last tensor: the others were already summed
    with pytest.raises(ValueError):
        aggregator.add(bad, 1)
    with pytest.raises(RuntimeError, match="start a new one"):
        aggregator.result()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tensorwise_mean_is_bit_identical_to_the_streaming_aggregator(strategy: str) -> None:
    updates = [(make_delta(i, dyadic=False), 7 * i + 1) for i in range(5)]
    lazy = TensorwiseMean(strategy, MANIFEST, updates)
    eager = aggregate(strategy, updates)
    assert list(lazy) == sorted(MANIFEST)
    for name in MANIFEST:
        assert lazy[name].tobytes() == eager[name].tobytes()
    with pytest.raises(ValueError, match="missing tensor"):
        TensorwiseMean(strategy, MANIFEST, [({}, 1)])
