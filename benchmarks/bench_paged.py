"""The paged cache and continuous batching, measured.

(a) Memory: a workload of a few hundred requests with heavy-tailed lengths, and the
    share of allocated KV memory that holds real tokens under three layouts: a
    contiguous cache reserved at the maximum length, a contiguous cache reserved
    at each request's own prompt + max_new_tokens, and the paged cache (block 16).
    Computed over every request's lifetime (rows held against rows reserved at each
    decode step), and measured on a real scheduler run for the paged layout.
(b) Throughput: new tokens/s generating a batch of requests one at a time, and by
    continuous batching, under the same KV memory budget, NumPy, preset small.
(c) Paged reads: gathering a sequence's blocks (one ``take``) then attention,
    against attention reading the blocks in place (blockwise, online softmax).
(d) Batched decode attention: one attention per sequence over its own gathered
    rows, against one masked attention over all sequences padded to the longest.

    python benchmarks/bench_paged.py            # a few minutes here
    python benchmarks/bench_paged.py --quick
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from engine.model import PRESETS, Model, ModelConfig
from engine.scheduler import Scheduler
from kvcache_xp import PagedKVCache, load_backend

HERE = Path(__file__).resolve().parent


def draw_workload(rng: np.random.Generator, count: int):
    """Heavy-tailed lengths: prompts ~10-1000 tokens, outputs ~10-500 (log-normal,
    clipped), and a max_new_tokens the request asked for (the output may stop
    earlier, at EOS): a power of two at or above the output, at most 512."""
    prompts = np.clip(rng.lognormal(np.log(120), 1.0, count), 10, 1000).astype(int)
    outputs = np.clip(rng.lognormal(np.log(80), 0.9, count), 10, 500).astype(int)
    asked = np.minimum(2 ** np.ceil(np.log2(outputs)).astype(int), 512)
    asked = np.maximum(asked, outputs)
    return prompts, outputs, asked


def lifetime_utilization(prompts, outputs, asked, max_len: int, block_size: int):
    """Rows holding tokens / rows reserved, summed over every request's decode steps."""
    held = reserved_max = reserved_own = reserved_paged = 0
    for prompt, out, ask in zip(prompts, outputs, asked, strict=True):
        for t in range(out):  # at decode step t the sequence holds prompt + t rows
            rows = prompt + t
            held += rows
            reserved_max += max_len
            reserved_own += prompt + ask
            reserved_paged += math.ceil(rows / block_size) * block_size
    return {
        "contiguous, reserved at max length": held / reserved_max,
        "contiguous, reserved at prompt + max_new_tokens": held / reserved_own,
        f"paged, block {block_size}": held / reserved_paged,
    }


def measured_paged_utilization(backend, prompts, outputs, block_size: int, num_blocks: int):
    """A real scheduler run on a tiny model, each request stopping at its drawn
    output length; the scheduler's own accounting of rows held against rows of
    the blocks held, summed over decode steps."""
    config = ModelConfig(64, 16, 1, 1, 2048)
    model = Model(config, seed=0, xp=backend.xp, device=backend.device)
    scheduler = Scheduler(model, num_blocks=num_blocks, block_size=block_size)
    rng = np.random.default_rng(1)
    for prompt, out in zip(prompts, outputs, strict=True):
        scheduler.add([int(t) for t in rng.integers(0, 64, prompt)], int(out))
    start = time.perf_counter()
    scheduler.run()
    elapsed = time.perf_counter() - start
    stats = scheduler.stats
    return stats.held_rows / stats.allocated_rows, stats, elapsed


def throughput(backend, size, requests, budget_rows, block_size):
    """Seconds to generate the same requests one at a time (each with a contiguous
    KVCache of its own size: the budget holds any one of them) and by continuous
    batching over a pool of ``budget_rows`` rows, batch-invariant and not."""
    config = PRESETS[size]
    model = Model(config, seed=0, xp=backend.xp, device=backend.device)
    rng = np.random.default_rng(2)
    work = [
        ([int(t) for t in rng.integers(0, config.vocab_size, rng.integers(16, 128))], int(n))
        for n in rng.integers(64, 256, requests)
    ]
    start = time.perf_counter()
    solo_tokens = []
    for prompt, n in work:
        assert len(prompt) + n <= budget_rows
        solo_tokens.append(model.generate(prompt, n))
    results = {"one request at a time": (time.perf_counter() - start, None, True)}
    for invariant in (True, False):
        scheduler = Scheduler(
            model,
            num_blocks=budget_rows // block_size,
            block_size=block_size,
            batch_invariant=invariant,
        )
        for prompt, n in work:
            scheduler.add(prompt, n)
        start = time.perf_counter()
        tokens = scheduler.run()
        name = "continuous batching, " + ("batch-invariant" if invariant else "batched matmuls")
        results[name] = (time.perf_counter() - start, scheduler.stats, tokens == solo_tokens)
    return config, sum(n for _, n in work), results


# -- (c) reading the blocks ------------------------------------------------------------


def _attention_gathered(xp, q, sequence, layer, n_heads):
    keys, values = sequence.view(layer)  # one gathered copy (S, d) each
    s, d = keys.shape
    hd = d // n_heads
    qh = xp.reshape(q, (n_heads, 1, hd))
    kh = xp.permute_dims(xp.reshape(keys, (s, n_heads, hd)), (1, 2, 0))
    vh = xp.permute_dims(xp.reshape(values, (s, n_heads, hd)), (1, 0, 2))
    scores = xp.matmul(qh, kh) / math.sqrt(hd)
    probs = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
    return xp.reshape(xp.matmul(probs / xp.sum(probs, axis=-1, keepdims=True), vh), (d,))


def _attention_in_place(xp, q, sequence, layer, n_heads):
    """Blockwise attention over views of the pool, online softmax (flash-decoding)."""
    cache, length = sequence._cache, sequence.get_seq_length(layer)
    d = cache.d_model
    hd = d // n_heads
    qh = xp.reshape(q, (n_heads, 1, hd))
    running_max = running_sum = acc = None
    for index, block in enumerate(sequence.block_table):
        filled = min(cache.block_size, length - index * cache.block_size)
        kb = cache._keys[layer, block, :filled, :]  # a view: no gather
        vb = cache._values[layer, block, :filled, :]
        kh = xp.permute_dims(xp.reshape(kb, (filled, n_heads, hd)), (1, 2, 0))
        vh = xp.permute_dims(xp.reshape(vb, (filled, n_heads, hd)), (1, 0, 2))
        scores = xp.matmul(qh, kh) / math.sqrt(hd)  # (H, 1, filled)
        block_max = xp.max(scores, axis=-1, keepdims=True)
        new_max = block_max if running_max is None else xp.maximum(running_max, block_max)
        weights = xp.exp(scores - new_max)
        if running_max is None:
            running_sum, acc = xp.sum(weights, axis=-1, keepdims=True), xp.matmul(weights, vh)
        else:
            correction = xp.exp(running_max - new_max)
            running_sum = running_sum * correction + xp.sum(weights, axis=-1, keepdims=True)
            acc = acc * correction + xp.matmul(weights, vh)
        running_max = new_max
    return xp.reshape(acc / running_sum, (d,))


def paged_reads(backend, lengths, block_size, width=256, n_heads=4, repeats=30):
    xp, rng = backend.xp, np.random.default_rng(3)
    out = []
    for length in lengths:
        cache = PagedKVCache(
            1, width, length // block_size + 2, block_size, xp=xp, device=backend.device
        )
        sequence = cache.add_sequence()
        rows = xp.asarray(
            rng.standard_normal((length, width), dtype=np.float32), device=backend.device
        )
        sequence.append(0, rows, rows)
        q = xp.asarray(rng.standard_normal(width, dtype=np.float32), device=backend.device)
        a = np.asarray(_attention_gathered(xp, q, sequence, 0, n_heads))
        b = np.asarray(_attention_in_place(xp, q, sequence, 0, n_heads))
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5)
        timings = {}
        for name, fn in (("gather", _attention_gathered), ("in place", _attention_in_place)):
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(xp, q, sequence, 0, n_heads)
                samples.append(time.perf_counter() - start)
            timings[name] = statistics.median(samples)
        out.append((length, timings["gather"], timings["in place"]))
    return out


def batched_attention(backend, batch, width, n_heads, block_size=16, repeats=10):
    """Per-sequence attention (what the engine does) against one masked attention
    over the batch padded to its longest sequence; seconds per layer-step each."""
    xp, rng = backend.xp, np.random.default_rng(4)
    hd = width // n_heads
    pool = PagedKVCache(1, width, 2048, block_size, xp=xp, device=backend.device)
    lengths = [int(n) for n in rng.integers(100, 300, batch)]
    sequences = [pool.add_sequence() for _ in range(batch)]
    for sequence, length in zip(sequences, lengths, strict=True):
        rows = xp.asarray(
            rng.standard_normal((length, width), dtype=np.float32), device=backend.device
        )
        sequence.append(0, rows, rows)
    q = xp.asarray(rng.standard_normal((batch, width), dtype=np.float32), device=backend.device)

    def per_sequence():
        return xp.concat(
            [
                xp.reshape(_attention_gathered(xp, q[i, :], s, 0, n_heads), (1, width))
                for i, s in enumerate(sequences)
            ],
            axis=0,
        )

    def masked():
        n_blocks = max(s.num_blocks for s in sequences)
        table = np.zeros((batch, n_blocks), np.int64)
        for i, s in enumerate(sequences):
            table[i, : s.num_blocks] = s.block_table
        ids = xp.asarray(np.reshape(table, (-1,)), device=backend.device)
        span = n_blocks * block_size
        keys = xp.take(pool._keys[0, ...], ids, axis=0)
        values = xp.take(pool._values[0, ...], ids, axis=0)
        kh = xp.permute_dims(xp.reshape(keys, (batch, span, n_heads, hd)), (0, 2, 3, 1))
        vh = xp.permute_dims(xp.reshape(values, (batch, span, n_heads, hd)), (0, 2, 1, 3))
        scores = xp.matmul(xp.reshape(q, (batch, n_heads, 1, hd)), kh) / math.sqrt(hd)
        valid = xp.reshape(xp.arange(span, device=backend.device), (1, 1, 1, span)) < xp.reshape(
            xp.asarray(lengths, device=backend.device), (batch, 1, 1, 1)
        )
        scores = xp.where(valid, scores, xp.asarray(-math.inf, device=backend.device))
        probs = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
        probs = probs / xp.sum(probs, axis=-1, keepdims=True)
        return xp.reshape(xp.matmul(probs, vh), (batch, width))

    assert np.allclose(np.asarray(per_sequence()), np.asarray(masked()), rtol=1e-4, atol=1e-5)
    timings = {}
    for name, fn in (("per sequence", per_sequence), ("masked batch", masked)):
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        timings[name] = statistics.median(samples)
    return timings


def _plot(utilization, measured, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [*utilization, "paged, measured run"]
    values = [*utilization.values(), measured]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bars = ax.barh(names, [100 * v for v in values], color=["#bbb", "#999", "#2a7", "#185"])
    ax.bar_label(bars, labels=[f"{100 * v:.1f}%" for v in values], padding=3)
    ax.set_xlim(0, 110)
    ax.set_xlabel("share of allocated KV memory holding real tokens (%)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", type=Path, default=HERE / "paged_memory.png")
    args = parser.parse_args()
    backend = load_backend(args.backend)
    block_size = 16
    count = 60 if args.quick else 300
    prompts, outputs, asked = draw_workload(np.random.default_rng(0), count)
    max_len = int((prompts + asked).max())

    print(f"# Paged KV cache and continuous batching on {backend.name}")
    print(
        f"machine: {platform.machine()}, python {platform.python_version()}, "
        f"numpy {np.__version__}\n"
    )
    print(
        f"## (a) Memory: {count} requests; prompt tokens median {int(np.median(prompts))}, "
        f"p99 {int(np.percentile(prompts, 99))}, max {prompts.max()}; output tokens median "
        f"{int(np.median(outputs))}, p99 {int(np.percentile(outputs, 99))}, max {outputs.max()}; "
        f"max length {max_len}\n"
    )
    utilization = lifetime_utilization(prompts, outputs, asked, max_len, block_size)
    measured, stats, elapsed = measured_paged_utilization(
        backend, prompts, outputs, block_size, num_blocks=2048
    )
    print("| layout | KV memory holding tokens | waste |")
    print("|---|---:|---:|")
    for name, value in utilization.items():
        print(f"| {name} | {value:.1%} | {1 - value:.1%} |")
    print(
        f"| paged, block {block_size}, measured scheduler run | {measured:.1%} "
        f"| {1 - measured:.1%} |"
    )
    print(
        f"\n(the measured run: {stats.decode_steps} decode steps, batches up to "
        f"{stats.max_batch}, {stats.preemptions} preemptions, peak {stats.peak_used_blocks} "
        f"of 2048 blocks, {elapsed:.1f} s)"
    )

    plans = [("small", 12, 2048)] if args.quick else [("small", 64, 8192), ("medium", 32, 8192)]
    for size, requests, budget in plans:
        config, new_tokens, results = throughput(backend, size, requests, budget, block_size)
        print(
            f"\n## (b) Throughput: {requests} requests (prompts 16-127, outputs 64-255 tokens), "
            f"preset {size} ({config.n_layers} layers x {config.d_model}), KV budget {budget} "
            f"rows ({budget // block_size} blocks of {block_size})\n"
        )
        print(
            "| mode | new tokens/s | speed-up | largest batch | preemptions | tokens equal solo |"
        )
        print("|---|---:|---:|---:|---:|---|")
        solo = results["one request at a time"][0]
        for name, (seconds, stats, same) in results.items():
            batch = stats.max_batch if stats else 1
            preempted = stats.preemptions if stats else 0
            print(
                f"| {name} | {new_tokens / seconds:.0f} | {solo / seconds:.2f}x | {batch} "
                f"| {preempted} | {same} |"
            )

    lengths = [256, 1024] if args.quick else [256, 1024, 4096]
    reads = paged_reads(backend, lengths, block_size)
    print(
        f"\n## (c) One decode attention over a paged sequence (4 heads x 64, block {block_size})\n"
    )
    print("| rows | gather + attention (µs) | in place, blockwise (µs) | in place / gather |")
    print("|---:|---:|---:|---:|")
    for length, gather, in_place in reads:
        print(
            f"| {length} | {gather * 1e6:.0f} | {in_place * 1e6:.0f} | {in_place / gather:.1f}x |"
        )

    print(
        "\n## (d) Decode attention for a batch of 32 sequences of 100-299 rows (per layer-step)\n"
    )
    print("| width (heads) | per sequence (ms) | one masked batch (ms) | masked / per sequence |")
    print("|---|---:|---:|---:|")
    for width, heads in ((256, 4), (512, 8)):
        t = batched_attention(backend, 32, width, heads)
        print(
            f"| {width} ({heads}) | {t['per sequence'] * 1e3:.2f} | {t['masked batch'] * 1e3:.2f} "
            f"| {t['masked batch'] / t['per sequence']:.1f}x |"
        )

    if _plot(utilization, measured, args.plot):
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
