"""Helpers shared by the tests: host copies, random rows on a backend."""

from __future__ import annotations

import re
from typing import Any

import array_api_compat
import numpy as np
import pytest

from kvcache_xp import (
    CacheOverflowError,
    DtypeError,
    KVCacheError,
    KVMismatchError,
    LayerIndexError,
    NamespaceMismatchError,
    ShapeError,
    to_numpy,
)

__all__ = [
    "BAD_APPENDS",
    "assert_same_state",
    "bad_appends",
    "check_bad_append",
    "host",
    "rows",
    "skip_without_float16",
    "snapshot",
]


def host(x: Any) -> np.ndarray:
    """A NumPy copy of any backend's array."""
    return to_numpy(x)


def rows(xp: Any, device: Any, rng: np.random.Generator, *shape: int, dtype: Any = None) -> Any:
    """Standard-normal float32 (or ``dtype``) rows of ``shape`` on the backend, and
    their host copy."""
    values = rng.standard_normal(shape).astype(np.float32)
    array = xp.asarray(values, device=device)
    if dtype is not None:
        array = xp.astype(array, dtype)
    return array


def skip_without_float16(xp: Any) -> None:
    if not hasattr(xp, "float16"):
        pytest.skip(f"{xp.__name__} has no float16 (it is not in the array API standard)")


def snapshot(cache: Any) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """The cache's observable state: lengths and the filled rows of every layer."""
    return cache.lengths, [
        host(part) for layer in range(cache.n_layers) for part in cache.view(layer)
    ]


def assert_same_state(cache, before) -> None:
    lengths, arrays = snapshot(cache)
    assert lengths == before[0]
    for now, then in zip(arrays, before[1], strict=True):
        np.testing.assert_array_equal(now, then)


def bad_appends(xp, device, width, n_layers, max_len):
    """Bad append arguments: name -> (args, expected error, message fragment)."""
    rng = np.random.default_rng(8)
    good = rows(xp, device, rng, 2, width)
    row = rows(xp, device, rng, width)
    wide = rows(xp, device, rng, 2, width + 1)
    cube = rows(xp, device, rng, 1, 2, width)
    scalar = xp.asarray(1.0, device=device)
    ints = xp.asarray(np.ones((2, width), dtype=np.int32), device=device)
    host_rows = np.ones((2, width), np.float32)
    return {
        "layer -1": ((-1, good, good), LayerIndexError, "layer_idx -1 is out of range"),
        "layer n_layers": ((n_layers, good, good), LayerIndexError, f"has {n_layers} layers"),
        "layer str": (("0", good, good), LayerIndexError, "must be an int"),
        "layer float": ((1.0, good, good), LayerIndexError, "must be an int"),
        "k rank 3": ((0, cube, cube), ShapeError, "rank 3"),
        "k rank 0": ((0, scalar, scalar), ShapeError, "rank 0"),
        "k too wide": ((0, wide, good), ShapeError, f"k has width {width + 1}"),
        "v too wide": ((0, good, wide), ShapeError, f"v has width {width + 1}"),
        "k, v rows differ": (
            (0, good, good[:1, :]),
            KVMismatchError,
            f"k has shape (2, {width}) but v",
        ),
        "k row, v batch": ((0, row, good[:1, :]), KVMismatchError, "they must match"),
        "integer rows": ((0, ints, ints), DtypeError, "real floating"),
        "host list": ((0, [[0.0] * width], [[0.0] * width]), NamespaceMismatchError, "list"),
        "overflow prefill": (
            (
                0,
                rows(xp, device, rng, max_len - 2, width),
                rows(xp, device, rng, max_len - 2, width),
            ),
            CacheOverflowError,
            f"appending {max_len - 2} would need {max_len + 1} rows",
        ),
        **(
            {}
            if array_api_compat.is_numpy_namespace(xp)
            else {
                "numpy array": ((0, host_rows, host_rows), NamespaceMismatchError, "numpy.ndarray")
            }
        ),
    }


BAD_APPENDS = [
    "layer -1", "layer n_layers", "layer str", "layer float", "k rank 3", "k rank 0",
    "k too wide", "v too wide", "k, v rows differ", "k row, v batch", "integer rows",
    "host list", "overflow prefill", "numpy array",
]  # fmt: skip


def check_bad_append(
    cache: Any, append: Any, xp: Any, device: Any, case: str, max_len: int
) -> None:
    """Fill every layer of ``cache`` with 3 rows, make the bad call ``case`` through
    ``append`` (a bound method of the cache), and assert its specific error, a
    message naming what was expected and what came, and an unchanged cache."""
    cases = bad_appends(xp, device, cache.d_model, cache.n_layers, max_len)
    if case not in cases:
        pytest.skip(f"{case}: not a mismatch on {xp.__name__}")
    args, error, message = cases[case]
    rng = np.random.default_rng(9)
    for layer in range(cache.n_layers):  # some history in every layer
        block = rows(xp, device, rng, 3, cache.d_model)
        cache.append(layer, block, block)
    before = snapshot(cache)
    with pytest.raises(error, match=re.escape(message)):
        append(*args)
    assert issubclass(error, KVCacheError)
    assert_same_state(cache, before)
