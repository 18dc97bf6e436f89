"""A bounded memo for the planner's reduced event models (placement.ilp.routing.routed_stream,
placement.ilp.prefillpool.pool_delay_sample).

Both are seeded, so equal inputs give the same sample; one `make_plan` evaluates each 2-3 times with equal
inputs (the prediction of the ILP's plan, then of the plan the report and the verification take), and ~1 s
each on a hybrid fleet (measured: fleet-single-turn 2.7 s of a 4.5 s plan). The memo keys on the inputs'
values (numpy arrays by dtype, shape and bytes; a TierModel by its fields, it is a frozen dataclass) and
hands out copies, so a caller that writes into a result cannot change the next one. Inputs that cannot be
hashed are computed every time.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, ParamSpec, TypeVar

import numpy as np

MAX_ENTRIES = 32  # per function; a plan needs a few, the verification's rounds a few more

P = ParamSpec("P")
R = TypeVar("R")


def _key(x: Any) -> Hashable:
    if isinstance(x, np.ndarray):
        return ("ndarray", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, tuple):
        return tuple(_key(y) for y in x)
    return x  # type: ignore[no-any-return]


def _copy(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, tuple):
        return tuple(_copy(y) for y in x)
    return x


def memoised(fn: Callable[P, R]) -> Callable[P, R]:
    cache: OrderedDict[Hashable, R] = OrderedDict()
    hits = [0]

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        key = (tuple(_key(a) for a in args), tuple(sorted((k, _key(v)) for k, v in kwargs.items())))
        try:
            found = key in cache
        except TypeError:  # an input that cannot be hashed: no memo
            return fn(*args, **kwargs)
        if found:
            hits[0] += 1
            cache.move_to_end(key)
        else:
            cache[key] = fn(*args, **kwargs)
            if len(cache) > MAX_ENTRIES:
                cache.popitem(last=False)
        return _copy(cache[key])  # type: ignore[no-any-return]

    wrapper.memo_hits = lambda: hits[0]  # type: ignore[attr-defined]
    wrapper.memo_clear = cache.clear  # type: ignore[attr-defined]
    return wrapper
