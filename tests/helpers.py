"""Helpers shared by the tests: host copies, random rows on a backend."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvcache_xp import to_numpy

__all__ = ["host", "rows", "skip_without_float16"]


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
