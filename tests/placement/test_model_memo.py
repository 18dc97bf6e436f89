"""placement.ilp.memo: the reduced event models are memoised by value and hand out copies."""

from __future__ import annotations

import numpy as np

from placement.ilp.memo import memoised
from placement.ilp.routing import routed_stream


def test_equal_inputs_are_computed_once_and_results_are_copies() -> None:
    calls: list[int] = []

    @memoised
    def f(x: np.ndarray, k: float) -> tuple[np.ndarray, float]:
        calls.append(1)
        return x * k, k

    a = f(np.arange(4.0), 2.0)
    a[0][0] = 99.0  # a caller writing into its result
    b = f(np.arange(4.0), 2.0)  # an equal array, not the same object
    assert len(calls) == 1 and f.memo_hits() == 1  # type: ignore[attr-defined]
    assert b[0].tolist() == [0.0, 2.0, 4.0, 6.0]
    f(np.arange(4.0), 3.0)  # another value: computed
    f(np.arange(4, dtype=np.int64), 2.0)  # same values, another dtype: computed
    assert len(calls) == 3


def test_unhashable_inputs_are_computed_every_time() -> None:
    calls: list[int] = []

    @memoised
    def g(xs: list[int]) -> int:
        calls.append(1)
        return sum(xs)

    assert g([1, 2]) == 3 and g([1, 2]) == 3
    assert len(calls) == 2


def test_the_routing_model_memoised_equals_a_fresh_run() -> None:
    args = (
        np.array([500.0, 3000.0, 9000.0]),
        np.array([True, True, False]),
        np.array([0.0, 0.0, 0.8]),
        2.0,
        3,
        0.04,
        300.0,
        (0.3, 0.2),
    )
    first = routed_stream(*args, arrivals=2_000)
    again = routed_stream(*args, arrivals=2_000)
    fresh = routed_stream.__wrapped__(*args, arrivals=2_000)  # type: ignore[attr-defined]
    for x, y, z in zip(first, again, fresh, strict=True):
        assert np.array_equal(x, y) and np.array_equal(x, z)
