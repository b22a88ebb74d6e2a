"""engine.scheduler: continuous batching over the paged cache equals solo generation.

The oracle: ``Model.generate`` for each request alone (through the contiguous
``KVCache``), token for token.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import host

from engine.model import Model, ModelConfig
from engine.scheduler import Scheduler, generate_batch
from kvcache_xp import PagedKVCache

CONFIG = ModelConfig(300, 32, 2, 2, 256)


def workload(seed: int, count: int, max_prompt: int = 30, max_new: int = 40):
    rng = np.random.default_rng(seed)
    prompts = [
        [int(t) for t in rng.integers(0, CONFIG.vocab_size, rng.integers(1, max_prompt))]
        for _ in range(count)
    ]
    return prompts, [int(n) for n in rng.integers(1, max_new, count)]


def test_decode_batch_rows_equal_solo_decode_steps(xp, device):
    model = Model(CONFIG, seed=0, xp=xp, device=device)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    solo, batch = [], []
    for prompt in prompts:
        cache = model.make_cache(16)
        model.prefill(prompt, cache)
        solo.append(host(model.decode_step(7, cache)))
        batch.append(model.make_cache(16))
        model.prefill(prompt, batch[-1])
    logits = host(model.decode_batch([7, 7, 7], batch))
    assert logits.shape == (3, CONFIG.vocab_size)
    if xp.__name__ in ("array_api_compat.numpy", "array_api_strict"):
        np.testing.assert_array_equal(logits, np.stack(solo))  # exact: see Model._matmul_rows
    else:
        np.testing.assert_allclose(logits, np.stack(solo), rtol=1e-5, atol=1e-5)
    assert [c.get_seq_length(0) for c in batch] == [4, 2, 7]


def test_batched_matmul_mode_agrees_with_solo_to_float32_rounding(xp, device):
    model = Model(CONFIG, seed=8, xp=xp, device=device)
    caches = []
    for prompt in ([1, 2, 3], [4], [5, 6, 7, 8]):
        caches.append(model.make_cache(16))
        model.prefill(prompt, caches[-1])
    fast = host(model.decode_batch([9, 9, 9], caches, batch_invariant=False))
    for cache in caches:
        cache.rollback(cache.get_seq_length(0) - 1)
    exact = host(model.decode_batch([9, 9, 9], caches))
    np.testing.assert_allclose(fast, exact, rtol=1e-5, atol=1e-5)
    prompts, counts = workload(8, 6)
    out = generate_batch(model, prompts, counts, num_blocks=40, block_size=4, batch_invariant=False)
    assert [len(tokens) for tokens in out] == counts


@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_batched_generation_equals_solo_generation(xp, device, block_size):
    model = Model(CONFIG, seed=1, xp=xp, device=device)
    prompts, counts = workload(block_size, 12)
    solo = [model.generate(p, n) for p, n in zip(prompts, counts, strict=True)]
    batched = generate_batch(
        model, prompts, counts, num_blocks=400 // block_size + 60, block_size=block_size
    )
    assert batched == solo


def test_forced_preemption_loses_nothing_and_changes_no_token(xp, device):
    model = Model(CONFIG, seed=2, xp=xp, device=device)
    prompts, counts = workload(7, 16)
    solo = [model.generate(p, n) for p, n in zip(prompts, counts, strict=True)]
    scheduler = Scheduler(model, num_blocks=16, block_size=4)  # 64 rows for 16 requests
    for prompt, count in zip(prompts, counts, strict=True):
        scheduler.add(prompt, count)
    assert scheduler.run() == solo
    assert scheduler.stats.preemptions > 0 and scheduler.stats.recomputed_tokens > 0
    assert scheduler.stats.peak_used_blocks <= 16
    assert scheduler.cache.num_free_blocks == 16 and scheduler.cache.sequences == []


def test_eos_stops_a_request_and_frees_its_blocks(xp, device):
    model = Model(CONFIG, seed=3, xp=xp, device=device)
    prompts, counts = [[5, 6], [7], [8, 9, 10]], [30, 30, 30]
    solo = [model.generate(p, n) for p, n in zip(prompts, counts, strict=True)]
    eos = solo[0][10]  # a token the first request generates
    expected = [tokens[: tokens.index(eos) + 1] if eos in tokens else tokens for tokens in solo]
    assert (
        generate_batch(model, prompts, 30, num_blocks=40, block_size=4, eos_token_id=eos)
        == expected
    )


def test_max_batch_size_caps_the_running_set():
    model = Model(CONFIG, seed=4)
    prompts, counts = workload(4, 10)
    scheduler = Scheduler(model, num_blocks=200, block_size=4, max_batch_size=3)
    for prompt, count in zip(prompts, counts, strict=True):
        scheduler.add(prompt, count)
    assert scheduler.run() == [model.generate(p, n) for p, n in zip(prompts, counts, strict=True)]
    assert scheduler.stats.max_batch == 3


def test_thousands_of_lifecycles_leak_no_block():
    """Many short requests through a small pool: every block comes back, every time."""
    model = Model(ModelConfig(64, 16, 1, 1, 64), seed=5)
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(0, 64, rng.integers(1, 12))] for _ in range(1200)]
    counts = [int(n) for n in rng.integers(1, 12, 1200)]
    scheduler = Scheduler(model, num_blocks=24, block_size=2)
    for prompt, count in zip(prompts, counts, strict=True):
        scheduler.add(prompt, count)
    while scheduler.waiting or scheduler.running:
        scheduler.step()
        held = sum(r.sequence.num_blocks for r in scheduler.running)
        assert scheduler.cache.num_used_blocks == held  # nothing held by the departed
    assert scheduler.cache.num_free_blocks == 24 and scheduler.stats.preemptions > 0
    results = [r.generated for r in sorted(scheduler.finished, key=lambda r: r.request_id)]
    spot = range(0, 1200, 97)  # solo generation for a sample of them
    assert [results[i] for i in spot] == [model.generate(prompts[i], counts[i]) for i in spot]


@pytest.mark.parametrize(
    ("prompt", "count", "error", "message"),
    [
        ([1] * 60, 10, ValueError, "needs 18 blocks of 4 rows; the pool has 16"),
        ([1], 0, ValueError, "max_new_tokens must be >= 1"),
        ([400], 3, ValueError, "outside the vocabulary"),
        ([1] * 250, 10, ValueError, "max_seq_len=256"),
        ([1], 2.5, TypeError, "max_new_tokens must be an int"),
    ],
)
def test_requests_that_could_never_run_are_refused(prompt, count, error, message):
    scheduler = Scheduler(Model(CONFIG), num_blocks=16, block_size=4)
    with pytest.raises(error, match=message):
        scheduler.add(prompt, count)
    assert not scheduler.waiting


def test_decode_batch_needs_one_cache_per_token(xp, device):
    model = Model(CONFIG, xp=xp, device=device)
    caches = [model.make_cache(8), model.make_cache(8)]
    with pytest.raises(ValueError, match="3 tokens but 2 caches"):
        model.decode_batch([1, 2, 3], caches)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.decode_batch([1, 999], caches)
    assert [c.get_seq_length(0) for c in caches] == [0, 0]


def test_generate_batch_checks_its_arguments():
    model = Model(CONFIG)
    with pytest.raises(ValueError, match="2 prompts but 3 max_new_tokens"):
        generate_batch(model, [[1], [2]], [1, 2, 3], num_blocks=8)
    assert generate_batch(model, [[1], [2, 3]], 2, num_blocks=8, block_size=2) == [
        model.generate([1], 2),
        model.generate([2, 3], 2),
    ]
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        Scheduler(model, num_blocks=4, max_batch_size=0)


def test_the_scheduler_pool_matches_the_model(xp, device):
    scheduler = Scheduler(Model(CONFIG, xp=xp, device=device), num_blocks=5, block_size=8)
    assert isinstance(scheduler.cache, PagedKVCache)
    assert scheduler.cache.max_seq_len == CONFIG.max_seq_len and scheduler.cache.xp is xp


def test_llama_gqa_batches_equal_solo_generation(xp, device):
    """Rotary positions differ row by row in a batch; GQA caches are kv-heads wide."""
    llama = ModelConfig(
        300, 32, 2, 8, 256, d_ff=48, arch="llama", n_kv_heads=2, head_dim=8, qkv_bias=True
    )
    model = Model(llama, seed=3, xp=xp, device=device)
    prompts, max_new = workload(5, 8)
    solo = [model.generate(p, n) for p, n in zip(prompts, max_new, strict=True)]
    batched = generate_batch(model, prompts, max_new, num_blocks=24, block_size=4)
    assert batched == solo
