"""Contract 1: kvcache_xp.KVCache, on every backend.

Every value check compares against an independent oracle: the rows appended so
far, kept on the host (and, in the state machine, a plain Python list model).
"""

from __future__ import annotations

import sys
import types

import array_api_compat
import numpy as np
import pytest
from helpers import (
    BAD_APPENDS,
    assert_same_state,
    check_bad_append,
    host,
    rows,
    skip_without_float16,
    snapshot,
)

from kvcache_xp import (
    BackendMismatchError,
    CacheOverflowError,
    DeviceMismatchError,
    DtypeError,
    KVCache,
    LayerIndexError,
    LengthError,
    UnsupportedBackendError,
)

N_LAYERS, WIDTH, MAX_LEN = 3, 8, 16


def make_cache(xp, device, dtype="float32", n_layers=N_LAYERS, max_seq_len=MAX_LEN):
    return KVCache(n_layers, WIDTH, max_seq_len, dtype, xp=xp, device=device)


# -- the contract -------------------------------------------------------------------


def test_prefill_then_decode_returns_exactly_the_appended_rows(xp, device):
    rng = np.random.default_rng(0)
    cache = make_cache(xp, device)
    expected_k, expected_v = np.zeros((0, WIDTH), np.float32), np.zeros((0, WIDTH), np.float32)
    steps = [(5, WIDTH), (WIDTH,), (WIDTH,), (3, WIDTH), (WIDTH,), (1, WIDTH)]
    for shape in steps:
        k, v = rows(xp, device, rng, *shape), rows(xp, device, rng, *shape)
        keys, values = cache.append(1, k, v)
        expected_k = np.concatenate([expected_k, host(k).reshape(-1, WIDTH)])
        expected_v = np.concatenate([expected_v, host(v).reshape(-1, WIDTH)])
        assert tuple(keys.shape) == tuple(values.shape) == expected_k.shape  # no trailing rows
        assert keys.dtype == values.dtype == xp.float32
        assert keys.device == cache.device
        np.testing.assert_array_equal(host(keys), expected_k)
        np.testing.assert_array_equal(host(values), expected_v)
    assert cache.lengths == (0, 12, 0)
    assert cache.get_seq_length(1) == 12


def test_returns_alias_the_buffer_rollback_and_overwrite_shows_through(xp, device):
    """Portable proof of view semantics: an old return sees rows written later."""
    rng = np.random.default_rng(1)
    cache = make_cache(xp, device)
    first_k, _ = cache.append(0, rows(xp, device, rng, 4, WIDTH), rows(xp, device, rng, 4, WIDTH))
    cache.rollback(1)
    new_k = rows(xp, device, rng, 3, WIDTH)
    cache.append(0, new_k, rows(xp, device, rng, 3, WIDTH))
    # first_k is a view of rows [0, 4): rows 1..3 now hold new_k
    np.testing.assert_array_equal(host(first_k)[1:4], host(new_k))


def test_returns_are_views_of_one_preallocated_buffer(xp, device):
    rng = np.random.default_rng(2)
    cache = make_cache(xp, device)
    returned = [cache.append(2, rows(xp, device, rng, 5, WIDTH), rows(xp, device, rng, 5, WIDTH))]
    for _ in range(3):
        returned.append(cache.append(2, rows(xp, device, rng, WIDTH), rows(xp, device, rng, WIDTH)))
    keys = [k for k, _ in returned]
    values = [v for _, v in returned]
    if array_api_compat.is_numpy_array(keys[0]):
        full_shape = (N_LAYERS, MAX_LEN, WIDTH)
        for k, v in returned:
            assert k.base is not None and k.base.shape == full_shape
            assert v.base is not None and v.base.shape == full_shape
            assert np.shares_memory(k, keys[0]) and np.shares_memory(v, values[0])
            assert not np.shares_memory(k, v)
    elif array_api_compat.is_torch_array(keys[0]):
        itemsize = keys[0].element_size()
        layer_offset = 2 * MAX_LEN * WIDTH * itemsize  # layer 2 starts here in the buffer
        for group in (keys, values):
            storage = group[0].untyped_storage()
            assert storage.nbytes() == N_LAYERS * MAX_LEN * WIDTH * itemsize
            for x in group:
                assert x.untyped_storage().data_ptr() == storage.data_ptr()
                assert x.data_ptr() == storage.data_ptr() + layer_offset
    elif array_api_compat.is_cupy_array(keys[0]):
        import cupy

        for k, v in returned:
            assert cupy.shares_memory(k, keys[0]) and cupy.shares_memory(v, values[0])
    else:  # array_api_strict: no memory introspection in the standard
        pytest.skip("the standard exposes no memory introspection; aliasing tested above")


def test_layer_positions_are_independent(xp, device):
    rng = np.random.default_rng(3)
    cache = make_cache(xp, device)
    written = {layer: [] for layer in range(N_LAYERS)}
    plan = [(0, 4), (2, 1), (0, 1), (1, 7), (2, 2), (0, 1)]
    for layer, n in plan:
        k, v = rows(xp, device, rng, n, WIDTH), rows(xp, device, rng, n, WIDTH)
        cache.append(layer, k, v)
        written[layer].append((host(k), host(v)))
    assert cache.lengths == (6, 7, 3)
    for layer, parts in written.items():
        keys, values = cache.view(layer)
        np.testing.assert_array_equal(host(keys), np.concatenate([k for k, _ in parts]))
        np.testing.assert_array_equal(host(values), np.concatenate([v for _, v in parts]))


def test_float16_cache_stays_float16_and_holds_half_the_bytes(xp, device):
    skip_without_float16(xp)
    rng = np.random.default_rng(4)
    half, single = make_cache(xp, device, xp.float16), make_cache(xp, device, xp.float32)
    assert half.nbytes * 2 == single.nbytes == 2 * N_LAYERS * MAX_LEN * WIDTH * 4
    k, v = rows(xp, device, rng, 3, WIDTH), rows(xp, device, rng, 3, WIDTH)  # float32 input
    keys, values = half.append(0, k, v)
    keys, values = half.append(0, k[0, :], v[0, :])
    assert keys.dtype == values.dtype == xp.float16 and half.dtype == xp.float16
    expected = np.concatenate([host(k), host(k)[:1]]).astype(np.float16)
    np.testing.assert_array_equal(host(keys), expected)


def test_float64_input_is_cast_on_write_to_the_cache_dtype(xp, device):
    if not hasattr(xp, "float64"):
        pytest.skip(f"{xp.__name__} has no float64")
    rng = np.random.default_rng(5)
    cache = make_cache(xp, device)
    k = rows(xp, device, rng, 2, WIDTH, dtype=xp.float64)
    keys, _ = cache.append(0, k, k)
    assert keys.dtype == xp.float32
    np.testing.assert_array_equal(host(keys), host(k).astype(np.float32))


def test_empty_prefill_is_a_no_op(xp, device):
    cache = make_cache(xp, device)
    empty = xp.zeros((0, WIDTH), dtype=xp.float32, device=device)
    keys, _ = cache.append(0, empty, empty)
    assert tuple(keys.shape) == (0, WIDTH) and cache.lengths == (0, 0, 0)


def test_fill_to_exactly_max_seq_len(xp, device):
    rng = np.random.default_rng(6)
    cache = make_cache(xp, device)
    cache.append(
        0, rows(xp, device, rng, MAX_LEN - 1, WIDTH), rows(xp, device, rng, MAX_LEN - 1, WIDTH)
    )
    keys, _ = cache.append(0, rows(xp, device, rng, WIDTH), rows(xp, device, rng, WIDTH))
    assert tuple(keys.shape) == (MAX_LEN, WIDTH) and cache.get_seq_length(0) == MAX_LEN


def test_reset_and_rollback(xp, device):
    rng = np.random.default_rng(7)
    cache = make_cache(xp, device)
    blocks = [rows(xp, device, rng, 6, WIDTH) for _ in range(N_LAYERS)]
    for layer, block in enumerate(blocks):
        cache.append(layer, block, block)
    cache.rollback(4)
    assert cache.lengths == (4, 4, 4)
    for layer, block in enumerate(blocks):
        np.testing.assert_array_equal(host(cache.view(layer)[0]), host(block)[:4])
    replacement = rows(xp, device, rng, WIDTH)
    keys, _ = cache.append(1, replacement, replacement)  # overwrites old row 4
    np.testing.assert_array_equal(host(keys)[4], host(replacement))
    cache.rollback(0)
    assert cache.lengths == (0, 0, 0)
    cache.append(0, blocks[0], blocks[0])
    cache.reset()
    assert cache.lengths == (0, 0, 0)
    assert tuple(cache.view(0)[0].shape) == (0, WIDTH)


# -- bad input: a specific error, a message naming expected and received, no change --


@pytest.mark.parametrize("case", BAD_APPENDS)
def test_bad_append_raises_specific_error_and_changes_nothing(xp, device, case):
    cache = make_cache(xp, device)
    check_bad_append(cache, cache.append, xp, device, case, MAX_LEN)


def test_overflow_of_a_full_layer_on_decode(xp, device):
    rng = np.random.default_rng(10)
    cache = make_cache(xp, device, max_seq_len=4)
    block = rows(xp, device, rng, 4, WIDTH)
    cache.append(0, block, block)
    before = snapshot(cache)
    with pytest.raises(CacheOverflowError, match="holds 4 of 4 rows"):
        cache.append(0, block[0, :], block[0, :])
    assert_same_state(cache, before)


def test_array_on_another_device_is_refused(xp, device):
    if xp.__name__ == "array_api_strict":
        other = xp.Device("device1")
    elif array_api_compat.is_torch_namespace(xp) and str(device).startswith("cuda"):
        other = "cpu"
    else:
        pytest.skip(f"{xp.__name__} on {device}: no second device to misplace an array on")
    cache = make_cache(xp, device)
    block = xp.ones((2, WIDTH), dtype=xp.float32, device=device)
    cache.append(0, block, block)
    before = snapshot(cache)
    stray = xp.ones((2, WIDTH), dtype=xp.float32, device=other)
    with pytest.raises(DeviceMismatchError, match="the cache is on device"):
        cache.append(0, stray, stray)
    with pytest.raises(BackendMismatchError):
        cache.append(0, block, stray)
    assert_same_state(cache, before)


@pytest.mark.parametrize("length", [-1, 4, 2.0, "1"])
def test_bad_rollback_raises_and_changes_nothing(xp, device, length):
    cache = make_cache(xp, device)
    block = xp.ones((3, WIDTH), dtype=xp.float32, device=device)
    cache.append(0, block, block)
    cache.append(1, block, block)
    cache.append(2, block, block)
    before = snapshot(cache)
    with pytest.raises(LengthError):
        cache.rollback(length)
    assert_same_state(cache, before)


def test_rollback_shortens_only_the_longer_layers(xp, device):
    cache = make_cache(xp, device)
    block = xp.ones((3, WIDTH), dtype=xp.float32, device=device)
    cache.append(0, block, block)
    cache.append(1, block[:1, :], block[:1, :])  # mid-step: layers hold 3, 1, 0 rows
    cache.rollback(2)
    assert cache.lengths == (2, 1, 0)
    with pytest.raises(LengthError, match=r"must be in \[0, 2\]"):
        cache.rollback(3)
    assert cache.lengths == (2, 1, 0)


def test_get_seq_length_and_view_check_the_layer(xp, device):
    cache = make_cache(xp, device)
    with pytest.raises(LayerIndexError):
        cache.get_seq_length(N_LAYERS)
    with pytest.raises(LayerIndexError):
        cache.view(-1)


# -- construction -----------------------------------------------------------------


def test_namespace_is_inferred_from_the_dtype(xp, device):
    if array_api_compat.is_cupy_namespace(xp):
        pytest.skip("CuPy dtypes are NumPy's: CuPy is chosen by passing xp=cupy")
    cache = KVCache(2, WIDTH, 4, xp.float32, device=device)
    assert cache.xp is xp
    assert cache.dtype == xp.float32


def test_nbytes_counts_both_buffers(xp, device):
    cache = KVCache(4, 24, 10, xp.float32, xp=xp, device=device)
    assert cache.nbytes == 2 * 4 * 10 * 24 * 4


def test_float16_on_a_backend_without_it_is_refused():
    import array_api_strict

    with pytest.raises(DtypeError, match="array_api_strict has no float16"):
        KVCache(1, 4, 4, "float16", xp=array_api_strict)


@pytest.mark.parametrize("dtype", ["int8", np.int32, "bool"])
def test_non_floating_cache_dtype_is_refused(dtype):
    with pytest.raises(DtypeError, match="real floating dtype"):
        KVCache(1, 4, 4, dtype)


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 4, 4), "n_layers must be a positive int"), ((1, 4, -3), "max_seq_len"),
     ((1, 2.5, 4), "d_model"), ((True, 4, 4), "n_layers")],
)  # fmt: skip
def test_bad_sizes_are_refused(args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        KVCache(*args)


def test_jax_is_refused_at_construction(monkeypatch):
    """JAX arrays are immutable; the check works from the namespace, jax need not be installed."""
    fake_jax_numpy = types.ModuleType("jax.numpy")
    monkeypatch.setitem(sys.modules, "jax.numpy", fake_jax_numpy)
    with pytest.raises(UnsupportedBackendError, match="JAX arrays are immutable"):
        KVCache(1, 4, 4, xp=fake_jax_numpy)


def test_a_module_that_is_not_an_array_namespace_is_refused():
    with pytest.raises(UnsupportedBackendError, match="not an array API namespace"):
        KVCache(1, 4, 4, xp=types)


# -- property-based: random appends, rollbacks, resets against a list model -------


def test_state_machine_against_a_list_model(xp, device):
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        invariant,
        rule,
        run_state_machine_as_test,
    )

    n_layers, width, max_len = 2, 3, 12

    class CacheMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.cache = KVCache(n_layers, width, max_len, xp=xp, device=device)
            # the model: per layer, the list of (k_row, v_row) host rows held
            self.model: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_layers)]

        @rule(
            layer=st.integers(0, n_layers - 1),
            n=st.integers(0, 6),
            decode=st.booleans(),
            seed=st.integers(0, 2**32 - 1),
        )
        def append(self, layer, n, decode, seed):
            rng = np.random.default_rng(seed)
            shape = (width,) if decode else (n, width)
            k, v = rows(xp, device, rng, *shape), rows(xp, device, rng, *shape)
            added = list(zip(host(k).reshape(-1, width), host(v).reshape(-1, width), strict=True))
            if len(self.model[layer]) + len(added) > max_len:
                with pytest.raises(CacheOverflowError):
                    self.cache.append(layer, k, v)
                return
            keys, values = self.cache.append(layer, k, v)
            self.model[layer].extend(added)
            self._check_layer(layer, keys, values)

        @rule(length=st.integers(-2, max_len + 2))
        def rollback(self, length):
            if 0 <= length <= max(len(held) for held in self.model):
                self.cache.rollback(length)
                self.model = [held[:length] for held in self.model]
            else:
                with pytest.raises(LengthError):
                    self.cache.rollback(length)

        @rule()
        def reset(self):
            self.cache.reset()
            self.model = [[] for _ in range(n_layers)]

        def _check_layer(self, layer, keys, values):
            held = self.model[layer]
            expected_k = np.array([k for k, _ in held], np.float32).reshape(-1, width)
            expected_v = np.array([v for _, v in held], np.float32).reshape(-1, width)
            np.testing.assert_array_equal(host(keys), expected_k)
            np.testing.assert_array_equal(host(values), expected_v)

        @invariant()
        def matches_model(self):
            assert self.cache.lengths == tuple(len(held) for held in self.model)
            for layer in range(n_layers):
                self._check_layer(layer, *self.cache.view(layer))

    run_state_machine_as_test(
        CacheMachine, settings=settings(max_examples=40, stateful_step_count=25, deadline=None)
    )
