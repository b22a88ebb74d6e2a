"""engine.reference: the naive concat cache agrees with KVCache row for row."""

from __future__ import annotations

import numpy as np
from helpers import host, rows, skip_without_float16

from engine.reference import ConcatKVCache
from kvcache_xp import KVCache


def test_concat_cache_returns_equal_kvcache_returns(xp, device):
    rng = np.random.default_rng(0)
    fast = KVCache(2, 6, 32, xp=xp, device=device)
    naive = ConcatKVCache(2, 6, xp=xp, device=device)
    for layer, n in [(0, 5), (1, 1), (0, 0), (0, 1), (1, 9), (0, 3)]:
        shape = (6,) if n == 1 else (n, 6)
        k, v = rows(xp, device, rng, *shape), rows(xp, device, rng, *shape)
        for got, want in zip(naive.append(layer, k, v), fast.append(layer, k, v), strict=True):
            np.testing.assert_array_equal(host(got), host(want))
    assert naive.lengths == fast.lengths == (9, 10)
    assert naive.get_seq_length(1) == 10
    assert naive.nbytes == 2 * 19 * 6 * 4


def test_concat_cache_keeps_its_dtype(xp, device):
    skip_without_float16(xp)
    naive = ConcatKVCache(1, 4, xp.float16, xp=xp, device=device)
    keys, _ = naive.append(0, xp.ones((2, 4), device=device), xp.ones((2, 4), device=device))
    assert keys.dtype == xp.float16
