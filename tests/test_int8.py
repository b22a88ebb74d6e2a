"""kvcache_xp.int8: the INT8 KV cache, on every backend.

Oracles: a host NumPy re-implementation of the quantization formula written here,
the error bound |x - dequant(quant(x))| <= scale / 2, the float32 cache's logits.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import BAD_APPENDS, check_bad_append, host, rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.model import Model, ModelConfig
from kvcache_xp import Int8KVCache, KVCache
from kvcache_xp.int8 import SUBNORMAL_SCALE_LIMIT, dequantize

N_LAYERS, WIDTH, MAX_LEN, GROUP = 3, 8, 16, 4


def make_cache(xp, device, **kwargs):
    kwargs = {"group_size": GROUP} | kwargs
    return Int8KVCache(N_LAYERS, WIDTH, MAX_LEN, xp=xp, device=device, **kwargs)


def host_quant_dequant(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The documented formula, on the host: (dequantized rows, scales)."""
    g = x.reshape(x.shape[0], -1, group).astype(np.float32)
    scales = np.abs(g).max(axis=-1) / np.float32(127)
    safe = np.where(scales > 0, scales, np.float32(1))
    q = np.clip(np.round(g / safe[..., None]), -127, 127)
    return (q * scales[..., None]).reshape(x.shape), scales


def test_prefill_and_decode_return_the_dequantized_rows_in_order(xp, device):
    rng = np.random.default_rng(0)
    cache = make_cache(xp, device)
    written = []
    for shape in [(5, WIDTH), (WIDTH,), (3, WIDTH), (WIDTH,)]:
        k, v = rows(xp, device, rng, *shape), rows(xp, device, rng, *shape)
        keys, values = cache.append(2, k, v)
        written.append((host(k).reshape(-1, WIDTH), host(v).reshape(-1, WIDTH)))
        expected_k = host_quant_dequant(np.concatenate([k for k, _ in written]), GROUP)[0]
        expected_v = host_quant_dequant(np.concatenate([v for _, v in written]), GROUP)[0]
        assert keys.dtype == values.dtype == xp.float32
        np.testing.assert_allclose(host(keys), expected_k, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(host(values), expected_v, rtol=1e-6, atol=1e-7)
    assert cache.lengths == (0, 0, 10)
    q_keys, key_scales, _, _ = cache.quantized_view(2)
    assert q_keys.dtype == xp.int8 and tuple(q_keys.shape) == (10, WIDTH)
    assert key_scales.dtype == xp.float32 and tuple(key_scales.shape) == (10, WIDTH // GROUP)


def _assert_within_half_a_scale(cache, layer, x: np.ndarray) -> None:
    q_keys, scales, _, _ = (host(a) for a in cache.quantized_view(layer))
    deq = host(cache.view(layer)[0])
    bound = np.repeat(scales, GROUP, axis=1) / 2  # per element
    # float32 arithmetic in q * scale may add one rounding step on top of scale / 2;
    # groups under 127 x the smallest normal float32 have subnormal scales (documented)
    tolerance = np.maximum(bound * (1 + 1e-6) + np.abs(x) * 1e-7, SUBNORMAL_SCALE_LIMIT)
    assert np.all(np.abs(x - deq) <= tolerance)
    assert np.abs(q_keys.astype(np.int32)).max() <= 127  # -128 is never used


def test_round_trip_error_is_at_most_half_a_scale(xp, device):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((MAX_LEN, WIDTH)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-6, 6, (MAX_LEN, 1)).astype(np.float32)  # many scales
    cache = make_cache(xp, device)
    array = xp.asarray(x, device=device)
    cache.append(0, array, array)
    _assert_within_half_a_scale(cache, 0, x)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    x=hnp.arrays(
        np.float32,
        (4, WIDTH),
        elements=st.floats(-(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32),
    )
)
def test_round_trip_bound_holds_for_any_finite_rows(xp, device, x):
    cache = make_cache(xp, device)
    array = xp.asarray(x, device=device)
    cache.append(1, array, array)
    _assert_within_half_a_scale(cache, 1, x)


def test_zero_rows_and_groups_neither_divide_by_zero_nor_warn(xp, device):
    x = np.zeros((3, WIDTH), np.float32)
    x[1, GROUP:] = [1.0, -2.0, 0.5, 3.0]  # row 1: a zero group, then a live one
    cache = make_cache(xp, device)
    array = xp.asarray(x, device=device)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        keys, _ = cache.append(0, array, array)
        keys, _ = cache.append(0, array[0, :], array[0, :])  # an all-zero decode row
    _, scales, _, _ = (host(a) for a in cache.quantized_view(0))
    assert np.all(host(keys)[[0, 2, 3]] == 0) and np.all(host(keys)[1, :GROUP] == 0)
    assert np.all(scales[[0, 2, 3]] == 0) and scales[1, 0] == 0
    assert np.all(np.isfinite(host(keys)))
    np.testing.assert_allclose(host(keys)[1, GROUP:], x[1, GROUP:], atol=3.0 / 254)


def test_an_outlier_maps_to_127_and_costs_precision_only_in_its_group(xp, device):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, WIDTH)).astype(np.float32)
    x[0, 1] = 1.0e4  # an outlier in group 0 of row 0
    x[1, GROUP + 2] = -3.0e38  # near float32's largest: must not overflow to inf
    cache = make_cache(xp, device)
    array = xp.asarray(x, device=device)
    keys, _ = cache.append(0, array, array)
    q_keys = host(cache.quantized_view(0)[0])
    assert q_keys[0, 1] == 127 and q_keys[1, GROUP + 2] == -127  # not saturated: exact ends
    deq = host(keys)
    assert np.all(np.isfinite(deq))
    assert abs(deq[0, 1] - 1.0e4) <= 1.0e4 / 254
    assert abs(deq[1, GROUP + 2] + 3.0e38) <= 3.0e38 / 254
    # the other groups keep their own, small scales
    np.testing.assert_allclose(deq[0, GROUP:], x[0, GROUP:], atol=np.abs(x[0, GROUP:]).max() / 254)
    np.testing.assert_allclose(deq[1, :GROUP], x[1, :GROUP], atol=np.abs(x[1, :GROUP]).max() / 254)
    _assert_within_half_a_scale(cache, 0, x)


@pytest.mark.parametrize("method", ["append", "append_quantized"])
@pytest.mark.parametrize("case", BAD_APPENDS)
def test_bad_append_raises_specific_error_and_changes_nothing(xp, device, case, method):
    cache = make_cache(xp, device)
    check_bad_append(cache, getattr(cache, method), xp, device, case, MAX_LEN)


def test_rollback_and_reset(xp, device):
    rng = np.random.default_rng(3)
    cache = make_cache(xp, device)
    block = rows(xp, device, rng, 6, WIDTH)
    cache.append(0, block, block)
    cache.rollback(2)
    replacement = rows(xp, device, rng, WIDTH)
    keys, _ = cache.append(0, replacement, replacement)
    expected = host_quant_dequant(np.concatenate([host(block)[:2], host(replacement)[None]]), GROUP)
    np.testing.assert_allclose(host(keys), expected[0], rtol=1e-6, atol=1e-7)
    cache.reset()
    assert cache.lengths == (0, 0, 0)


def test_bytes_are_a_quarter_of_float32_plus_the_scales(xp, device):
    int8 = Int8KVCache(4, 256, 32, xp=xp, device=device, group_size=64)
    f32 = KVCache(4, 256, 32, xp=xp, device=device)
    assert int8.nbytes == 2 * 4 * 32 * (256 + 4 * 4)
    assert int8.nbytes / f32.nbytes == pytest.approx(0.265625) and int8.nbytes / f32.nbytes <= 0.27


def test_group_size_must_divide_the_width():
    with pytest.raises(ValueError, match="group_size 3 must divide d_model 8"):
        Int8KVCache(1, 8, 4, group_size=3)
    assert Int8KVCache(1, 96, 4).group_size == 32  # gcd(96, 64)
    assert Int8KVCache(1, 256, 4).group_size == 64


# -- through the model ------------------------------------------------------------

CONFIG = ModelConfig(256, 128, 2, 2, 200)  # head_dim 64: one scale per token per head


class _DequantizingReader:
    """Only ``append``: the model reads dequantized copies, not folded scales."""

    def __init__(self, cache):
        self.append, self.get_seq_length = cache.append, cache.get_seq_length


def test_model_builds_an_int8_cache_with_one_scale_per_token_per_head(xp, device):
    cache = Model(CONFIG, xp=xp, device=device).make_cache(10, "int8")
    assert isinstance(cache, Int8KVCache) and cache.group_size == CONFIG.head_dim


# grouped-query attention: 8 query heads on 2 key/value heads, head_dim 16
GQA = ModelConfig(256, 64, 2, 8, 200, arch="llama", n_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("group", [None, 8], ids=["group=head_dim", "group=head_dim/2"])
@pytest.mark.parametrize("config", [CONFIG, GQA], ids=["mha", "gqa"])
def test_scale_folding_attention_equals_dequantized_attention(xp, device, config, group):
    model = Model(config, seed=1, xp=xp, device=device)
    make = lambda: Int8KVCache(  # noqa: E731
        config.n_layers, config.kv_dim, 40, xp=xp, device=device,
        group_size=group or config.head_dim,
    )  # fmt: skip
    folded, copies = make(), make()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    a = host(model.prefill(prompt, folded))
    b = host(model.prefill(prompt, _DequantizingReader(copies)))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for token in (5, 3, 5):
        a = host(model.decode_step(token, folded))
        b = host(model.decode_step(token, _DequantizingReader(copies)))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_int8_generation_runs_end_to_end_and_tracks_float32(xp, device):
    """The measured property (benchmarks/bench_int8.py): KL well under 1e-3 and the
    teacher-forced argmax agreeing almost everywhere, here on a small model."""
    model = Model(CONFIG, seed=2, xp=xp, device=device)
    prompt, n = [7, 7, 42, 1], 64
    reference = model.generate(prompt, n)
    tokens = model.generate(prompt, n, cache_dtype="int8")
    assert len(tokens) == n and all(0 <= t < CONFIG.vocab_size for t in tokens)
    f32, int8 = model.make_cache(len(prompt) + n), model.make_cache(len(prompt) + n, "int8")
    logits_f32 = [host(model.prefill(prompt, f32))]
    logits_int8 = [host(model.prefill(prompt, int8))]
    for token in reference[:-1]:
        logits_f32.append(host(model.decode_step(token, f32)))
        logits_int8.append(host(model.decode_step(token, int8)))
    p, q = np.stack(logits_f32), np.stack(logits_int8)
    log_p = (
        p
        - np.log(np.exp(p - p.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - p.max(-1, keepdims=True)
    )
    log_q = (
        q
        - np.log(np.exp(q - q.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - q.max(-1, keepdims=True)
    )
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    assert kl.mean() <= 1e-3, kl.mean()
    assert np.mean(p.argmax(-1) == q.argmax(-1)) >= 0.95


def test_dequantize_keeps_the_requested_dtype(xp, device):
    q = xp.asarray(np.array([[127, -127, 0, 1]], np.int8), device=device)
    scales = xp.asarray(np.array([[0.5]], np.float32), device=device)
    out = dequantize(xp, q, scales, xp.float32)
    assert out.dtype == xp.float32
    np.testing.assert_array_equal(host(out), [[63.5, -63.5, 0.0, 0.5]])
