"""kvcache_xp.backends: namespace resolution, dtype mapping, backend loading."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from helpers import host

from kvcache_xp import (
    BACKEND_NAMES,
    BackendUnavailableError,
    DtypeError,
    get_namespace,
    load_backend,
    to_numpy,
)
from kvcache_xp.backends import dtype_name, floating_dtype


def test_get_namespace_is_idempotent_and_matches_the_fixture(xp, device):
    assert get_namespace(xp) is xp
    x = xp.ones((2, 3), dtype=xp.float32, device=device)
    np.testing.assert_array_equal(to_numpy(x), np.ones((2, 3), np.float32))
    assert isinstance(host(x), np.ndarray)


def test_floating_dtype_maps_names_and_foreign_dtypes(xp):
    assert floating_dtype(xp, "float32") == xp.float32
    assert floating_dtype(xp, np.float32) == xp.float32  # a NumPy dtype, mapped by name
    assert floating_dtype(xp, np.dtype("float64")) == xp.float64
    assert dtype_name(xp.float32) == "float32"


def test_floating_dtype_refuses_integers_and_missing_dtypes(xp):
    with pytest.raises(DtypeError, match="got int16"):
        floating_dtype(xp, "int16")
    if not hasattr(xp, "bfloat16"):
        with pytest.raises(DtypeError, match="has no bfloat16"):
            floating_dtype(xp, "bfloat16")


def test_unknown_dtype_object_is_refused():
    with pytest.raises(DtypeError, match="unrecognised dtype"):
        dtype_name(object())


def test_namespace_defaults_to_numpy():
    assert get_namespace().__name__ == "array_api_compat.numpy"
    assert get_namespace(np) is get_namespace()


def test_load_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        load_backend("jax")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed")
def test_cupy_without_a_gpu_is_refused_with_the_reason():
    import cupy

    from kvcache_xp import KVCache

    if cupy.is_available():
        pytest.skip("this machine has a GPU: CuPy runs here")
    with pytest.raises(BackendUnavailableError, match="no GPU"):
        load_backend("cupy")
    with pytest.raises(BackendUnavailableError, match="no GPU"):
        KVCache(1, 4, 4, xp=cupy)


def test_backend_names_cover_the_documented_backends():
    assert set(BACKEND_NAMES) == {"numpy", "array_api_strict", "torch", "torch-cuda", "cupy"}
