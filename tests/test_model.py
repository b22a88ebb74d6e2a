"""Contract 2: engine.model.Model, checked through generation on every backend.

The oracles: greedy decoding by full recompute (``forward``, no cache at all), the
naive concatenating cache, and the NumPy backend's tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import host, skip_without_float16

from engine.model import PRESETS, Model, ModelConfig, RopeScaling
from engine.reference import ConcatKVCache, greedy_recompute
from kvcache_xp import KVCache

ONE_LAYER_ONE_HEAD = ModelConfig(97, 16, 1, 1, 160)
THREE_LAYERS_FOUR_HEADS = ModelConfig(128, 32, 3, 4, 160)
# Llama family: RoPE, RMSNorm, SwiGLU; 8 query heads on 2 key/value heads, head_dim 8
# (q width 64 != d_model 32, cache width 16), llama3 rope scaling, q/k/v biases.
# (A seeded tied head mostly echoes the input token; tests/test_checkpoint.py ties.)
LLAMA_GQA = ModelConfig(
    128, 32, 2, 8, 160, d_ff=48, arch="llama", n_kv_heads=2, head_dim=8,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16), rope_theta=500000.0, qkv_bias=True,
)  # fmt: skip


def numpy_tokens(config, seed, prompt, max_new_tokens, **kwargs) -> list[int]:
    return Model(config, seed=seed).generate(prompt, max_new_tokens, **kwargs)


@pytest.mark.parametrize(
    "config",
    [ONE_LAYER_ONE_HEAD, THREE_LAYERS_FOUR_HEADS, LLAMA_GQA],
    ids=["1L1H", "3L4H", "llama-gqa"],
)
@pytest.mark.parametrize("prompt", [[7], [3, 14, 15, 92, 65, 35, 8]], ids=["prompt1", "prompt7"])
@pytest.mark.parametrize("max_new_tokens", [1, 70])
def test_generate_equals_concat_cache_equals_full_recompute(
    xp, device, config, prompt, max_new_tokens
):
    model = Model(config, seed=11, xp=xp, device=device)
    with_cache = model.generate(prompt, max_new_tokens)
    with_concat = model.generate(
        prompt,
        max_new_tokens,
        cache=ConcatKVCache(config.n_layers, config.kv_dim, xp=xp, device=device),
    )
    recomputed = greedy_recompute(model, prompt, max_new_tokens)
    assert len(with_cache) == max_new_tokens
    assert with_cache == with_concat == recomputed
    assert with_cache == numpy_tokens(config, 11, prompt, max_new_tokens)
    if max_new_tokens >= 64:  # a sequence that repeats one token proves nothing
        assert len(set(recomputed)) >= 20, recomputed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_sequences_are_varied(seed):
    tokens = greedy_recompute(Model(THREE_LAYERS_FOUR_HEADS, seed=seed), [1, 2, 3], 64)
    assert len(set(tokens)) >= 20
    assert max(tokens.count(t) for t in set(tokens)) <= 16


class _DropsOldestRow(KVCache):
    """A broken cache: attention never sees row 0."""

    def append(self, layer_idx, k, v):
        keys, values = super().append(layer_idx, k, v)
        return keys[1:, :], values[1:, :]


class _WritesOneRowLate(KVCache):
    """A broken cache: each decode row lands one position too far (a wrong write index)."""

    def append(self, layer_idx, k, v):
        if k.ndim == 1:
            self._positions[layer_idx] += 1
            keys, values = super().append(layer_idx, k, v)
            return keys[1:, :], values[1:, :]
        return super().append(layer_idx, k, v)


@pytest.mark.parametrize("broken", [_DropsOldestRow, _WritesOneRowLate])
def test_the_harness_catches_a_broken_cache(xp, device, broken):
    """Proof that the generation tests can fail: history errors change the tokens."""
    config = THREE_LAYERS_FOUR_HEADS
    model = Model(config, seed=3, xp=xp, device=device)
    prompt = [5, 6, 7, 8]
    cache = broken(config.n_layers, config.d_model, 2 * 64 + 8, xp=xp, device=device)
    assert model.generate(prompt, 64, cache=cache) != model.generate(prompt, 64)


def test_float16_cache_matches_the_naive_cache_in_float16(xp, device):
    skip_without_float16(xp)
    config = THREE_LAYERS_FOUR_HEADS
    model = Model(config, seed=4, xp=xp, device=device)
    prompt = [9, 8, 7]
    cache = model.make_cache(len(prompt) + 80, xp.float16)
    tokens = model.generate(prompt, 80, cache=cache)
    naive = ConcatKVCache(config.n_layers, config.d_model, xp.float16, xp=xp, device=device)
    assert tokens == model.generate(prompt, 80, cache=naive)
    assert tokens == model.generate(prompt, 80, cache_dtype="float16")
    assert cache.dtype == xp.float16 and cache.view(0)[0].dtype == xp.float16
    assert len(set(tokens)) >= 20


class _Spy(KVCache):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def append(self, layer_idx, k, v):
        self.calls.append((layer_idx, tuple(k.shape)))
        return super().append(layer_idx, k, v)


def test_prefill_and_decode_call_append_as_the_contract_says(xp, device):
    config = THREE_LAYERS_FOUR_HEADS
    model = Model(config, seed=5, xp=xp, device=device)
    cache = _Spy(config.n_layers, config.d_model, 16, xp=xp, device=device)
    prompt = [1, 2, 3, 4, 5]
    model.prefill(prompt, cache)
    assert cache.calls == [(layer, (5, config.d_model)) for layer in range(config.n_layers)]
    cache.calls.clear()
    model.decode_step(6, cache)
    assert cache.calls == [(layer, (config.d_model,)) for layer in range(config.n_layers)]
    assert cache.lengths == (6, 6, 6)


def test_prefill_and_decode_logits_equal_forward(xp, device):
    config = THREE_LAYERS_FOUR_HEADS
    model = Model(config, seed=6, xp=xp, device=device)
    tokens = [4, 8, 15, 16, 23, 42]
    full = host(model.forward(tokens))  # (T, vocab)
    assert full.shape == (len(tokens), config.vocab_size) and full.dtype == np.float32
    cache = model.make_cache(len(tokens))
    np.testing.assert_allclose(
        host(model.prefill(tokens[:4], cache)), full[3], rtol=1e-4, atol=1e-4
    )
    for position in (4, 5):
        logits = host(model.decode_step(tokens[position], cache))
        assert logits.shape == (config.vocab_size,)
        np.testing.assert_allclose(logits, full[position], rtol=1e-4, atol=1e-4)


def test_generate_continues_a_cache_that_already_holds_a_context(xp, device):
    """Chunked prefill: the causal mask is offset by what the cache holds."""
    config = THREE_LAYERS_FOUR_HEADS
    model = Model(config, seed=7, xp=xp, device=device)
    cache = model.make_cache(40)
    model.prefill([10, 20, 30], cache)
    continued = model.generate([40, 50], 20, cache=cache)
    assert continued == model.generate([10, 20, 30, 40, 50], 20)


def test_same_seed_same_weights_other_seed_other_tokens():
    a = Model(THREE_LAYERS_FOUR_HEADS, seed=1).generate([1, 2], 32)
    assert a == Model(THREE_LAYERS_FOUR_HEADS, seed=1).generate([1, 2], 32)
    assert a != Model(THREE_LAYERS_FOUR_HEADS, seed=2).generate([1, 2], 32)


@pytest.mark.parametrize(
    ("prompt", "max_new_tokens", "error", "message"),
    [
        ([], 4, ValueError, "at least one token"),
        ([1, 128], 4, ValueError, "token id 128 outside the vocabulary"),
        ([-1], 4, ValueError, "token id -1"),
        (["a"], 4, TypeError, "sequence of ints"),
        ([1], -1, ValueError, "max_new_tokens must be >= 0"),
        ([1], 2.0, TypeError, "max_new_tokens must be an int"),
        ([1] * 100, 62, ValueError, "max_seq_len=160"),
    ],
)
def test_generate_rejects_bad_arguments(xp, device, prompt, max_new_tokens, error, message):
    model = Model(THREE_LAYERS_FOUR_HEADS, xp=xp, device=device)
    with pytest.raises(error, match=message):
        model.generate(prompt, max_new_tokens)


def test_generate_of_zero_tokens_and_up_to_max_seq_len(xp, device):
    model = Model(ModelConfig(50, 8, 1, 2, 12), xp=xp, device=device)
    assert model.generate([1, 2], 0) == []
    assert len(model.generate([1, 2], 11)) == 11  # positions 0..11: the last token is not fed


def test_decode_step_on_a_full_cache_leaves_it_untouched(xp, device):
    from kvcache_xp import CacheOverflowError

    model = Model(THREE_LAYERS_FOUR_HEADS, xp=xp, device=device)
    cache = model.make_cache(3)
    model.prefill([1, 2, 3], cache)
    with pytest.raises(CacheOverflowError):
        model.decode_step(4, cache)
    assert cache.lengths == (3, 3, 3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "divisible by n_heads=4"),
        ({"n_layers": 0}, "n_layers must be a positive int"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"d_ff": -1}, "d_ff"),
        ({"arch": "bert"}, "arch must be one of"),
        ({"arch": "llama", "n_heads": 2, "n_kv_heads": 3}, "multiple of n_kv_heads=3"),
        ({"arch": "llama", "head_dim": 3}, "even head_dim"),
        ({"n_kv_heads": 1}, "arch 'gpt2' has n_kv_heads == n_heads"),
        ({"qkv_bias": True}, "belong to arch 'llama'"),
        ({"arch": "llama", "rope_theta": 0.0}, "rope_theta must be > 0"),
    ],
)
def test_model_config_rejects_bad_shapes(fields, message):
    base = {"vocab_size": 10, "d_model": 8, "n_layers": 1, "n_heads": 2, "max_seq_len": 8}
    with pytest.raises(ValueError, match=message):
        ModelConfig(**(base | fields))


def test_presets_are_valid_configs():
    assert PRESETS["gpt2"].d_model == 768 and PRESETS["gpt2"].n_layers == 12
    for config in PRESETS.values():
        assert config.d_model % config.n_heads == 0


def test_llama_cache_rows_are_kv_width_and_rotated(xp, device):
    """The cache holds n_kv_heads * head_dim wide rows, keys after the rotation: the
    same token at two positions leaves two different keys and the same value."""
    model = Model(LLAMA_GQA, seed=3, xp=xp, device=device)
    cache = model.make_cache(8)
    assert cache.d_model == LLAMA_GQA.kv_dim == 16
    model.prefill([5, 5], cache)
    keys, values = (host(a) for a in cache.view(0))
    assert keys.shape == (2, 16)
    assert not np.allclose(keys[0], keys[1]) and np.allclose(values[0], values[1])
    # position 0 is not rotated: its key is the plain projection (RMSNorm, then W_k + b_k)
    w = {k: host(v) for k, v in model.weights.items()}
    x = w["wte"][5]
    h = x / np.sqrt(np.mean(x * x) + LLAMA_GQA.layer_norm_eps) * w["h0.ln_1.g"]
    k0 = (w["h0.attn.w_qkv"] @ h + w["h0.attn.b_qkv"])[64:80]
    np.testing.assert_allclose(keys[0], k0, rtol=1e-5, atol=1e-5)
