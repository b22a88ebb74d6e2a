"""Measure the preallocated KVCache against the naive concat cache and the bare slice write.

Three measurements, side by side in one run:

(a) per-step append cost (one decode step = one append per layer) of ``KVCache``
    and ``ConcatKVCache`` as the position grows, at 12 layers x 768 wide (GPT-2
    small's cache), float32;
(b) ``KVCache.append`` against the bare slice-write plus slice-view it wraps
    (the limit for this operation), median of many calls;
(c) end-to-end ``Model.generate`` time with each cache.

Prints markdown tables and, where matplotlib is installed, writes a PNG plot.

    python benchmarks/bench_cache.py            # the full run (under a minute here)
    python benchmarks/bench_cache.py --quick    # a small smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from engine.model import PRESETS, Model
from engine.reference import ConcatKVCache
from kvcache_xp import KVCache, load_backend

try:
    from tqdm import tqdm
except ImportError:  # the bench extra brings tqdm; without it, no progress bars

    def tqdm(iterable, **_kwargs):
        return iterable


HERE = Path(__file__).resolve().parent


def _rows(backend, rng, *shape):
    return backend.xp.asarray(rng.standard_normal(shape, dtype=np.float32), device=backend.device)


def _sync(backend, x) -> None:
    """Wait for a GPU backend to finish (no-op on the CPU)."""
    if backend.name == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    elif backend.name == "torch-cuda":
        import torch

        torch.cuda.synchronize()


# -- (a) per-step append cost against position --------------------------------------


def bench_append_vs_position(backend, positions, n_layers, width, steps_fast, steps_naive):
    rng = np.random.default_rng(0)
    row_k, row_v = _rows(backend, rng, width), _rows(backend, rng, width)
    longest = max(positions) + steps_fast
    cache = KVCache(n_layers, width, longest, xp=backend.xp, device=backend.device)
    results = []
    for position in tqdm(positions, desc="(a) append vs position"):
        history = _rows(backend, rng, position, width)
        cache.reset()
        for layer in range(n_layers):
            cache.append(layer, history, history)
        fast = []
        for _ in range(steps_fast):
            start = time.perf_counter()
            for layer in range(n_layers):
                out = cache.append(layer, row_k, row_v)
            _sync(backend, out[0])
            fast.append(time.perf_counter() - start)
        naive_cache = ConcatKVCache(n_layers, width, xp=backend.xp, device=backend.device)
        for layer in range(n_layers):
            naive_cache.append(layer, history, history)
        naive = []
        for _ in range(steps_naive):
            start = time.perf_counter()
            for layer in range(n_layers):
                out = naive_cache.append(layer, row_k, row_v)
            _sync(backend, out[0])
            naive.append(time.perf_counter() - start)
        del naive_cache
        results.append((position, statistics.median(fast), statistics.median(naive)))
    return results


# -- (b) KVCache.append against the bare slice write + view -------------------------


def bench_append_overhead(backend, width, position, calls, samples):
    """Median seconds per call of: KVCache.append; the bare two-line write + view in a
    function (what append wraps); the same two lines inlined in the loop (no call)."""
    xp, rng = backend.xp, np.random.default_rng(1)
    n_layers, capacity = 12, position + calls
    k, v = _rows(backend, rng, width), _rows(backend, rng, width)
    cache = KVCache(n_layers, width, capacity, xp=xp, device=backend.device)
    keys = xp.zeros((n_layers, capacity, width), dtype=xp.float32, device=backend.device)
    values = xp.zeros((n_layers, capacity, width), dtype=xp.float32, device=backend.device)

    def bare(layer_idx, k, v, pos):
        keys[layer_idx, pos, :] = k
        values[layer_idx, pos, :] = v
        return keys[layer_idx, : pos + 1, :], values[layer_idx, : pos + 1, :]

    history = _rows(backend, rng, position, width)

    def run_cache():
        cache.reset()
        cache.append(3, history, history)
        append = cache.append
        start = time.perf_counter()
        for _ in range(calls):
            append(3, k, v)
        return time.perf_counter() - start

    def run_bare():
        start = time.perf_counter()
        for pos in range(position, position + calls):
            bare(3, k, v, pos)
        return time.perf_counter() - start

    def run_inline():
        start = time.perf_counter()
        for pos in range(position, position + calls):
            keys[3, pos, :] = k
            values[3, pos, :] = v
            _ = keys[3, : pos + 1, :], values[3, : pos + 1, :]
        return time.perf_counter() - start

    timings = {"KVCache.append": [], "bare write + view (function)": [], "bare, inlined": []}
    runners = list(zip(timings.values(), (run_cache, run_bare, run_inline), strict=True))
    for runner in runners:  # warm up
        runner[1]()
    for _ in tqdm(range(samples), desc=f"(b) append overhead on {backend.name}"):
        for bucket, runner in runners:  # interleaved, so drift hits all three alike
            bucket.append(runner() / calls)
    return {name: statistics.median(values) for name, values in timings.items()}


# -- (c) end-to-end generate ----------------------------------------------------------


def bench_generate(backend, size, prompt_len, new_token_counts):
    config = PRESETS[size]
    model = Model(config, seed=0, xp=backend.xp, device=backend.device)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, config.vocab_size, prompt_len)]
    results = []
    for new_tokens in tqdm(new_token_counts, desc="(c) generate"):
        start = time.perf_counter()
        fast_tokens = model.generate(prompt, new_tokens)
        fast = time.perf_counter() - start
        naive_cache = ConcatKVCache(
            config.n_layers, config.d_model, xp=backend.xp, device=backend.device
        )
        start = time.perf_counter()
        naive_tokens = model.generate(prompt, new_tokens, cache=naive_cache)
        naive = time.perf_counter() - start
        results.append((new_tokens, fast, naive, fast_tokens == naive_tokens))
    return config, results


def _plot(results_a, n_layers, width, path: Path) -> bool:
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    positions = [p for p, _, _ in results_a]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(positions, [f * 1e6 for _, f, _ in results_a], "o-", label="KVCache (preallocated)")
    ax.loglog(positions, [n * 1e6 for _, _, n in results_a], "s-", label="ConcatKVCache (naive)")
    ax.set_xticks(positions, [str(p) for p in positions])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("position (rows already cached per layer)")
    ax.set_ylabel("one decode step of appends (µs)")
    ax.set_title(f"Append cost per decode step, {n_layers} layers x {width} wide, float32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--plot", type=Path, default=HERE / "append_cost.png")
    args = parser.parse_args()
    backend = load_backend(args.backend)
    n_layers, width = 12, 768
    if args.quick:
        positions, steps, counts, calls, samples = [256, 1024], (5, 2), [32], 200, 5
    else:
        positions, steps, counts, calls = [256, 512, 1024, 2048, 4096, 8192], (50, 7), None, 1000
        counts, samples = [256, 1024, 2000], 41

    print(f"# kvcache_xp benchmarks on {backend.name}")
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"python {platform.python_version()}, numpy {np.__version__}\n"
    )

    results_a = bench_append_vs_position(backend, positions, n_layers, width, *steps)
    print(f"## (a) One decode step of appends ({n_layers} layers x {width}, float32), median\n")
    print("| position | KVCache (µs/step) | ConcatKVCache (µs/step) | concat / KVCache |")
    print("|---:|---:|---:|---:|")
    for position, fast, naive in results_a:
        print(f"| {position} | {fast * 1e6:.1f} | {naive * 1e6:.0f} | {naive / fast:.0f}x |")

    overhead = bench_append_overhead(backend, width, 1024, calls, samples)
    base = overhead["bare write + view (function)"]
    print(
        f"\n## (b) One append call, width {width}, at position 1024, "
        f"median of {samples} x {calls} calls\n"
    )
    print("| operation | ns/call | vs bare (function) |")
    print("|---|---:|---:|")
    for name, seconds in overhead.items():
        print(f"| {name} | {seconds * 1e9:.0f} | {seconds / base:.2f}x |")

    config, results_c = bench_generate(backend, "small", 16, counts)
    print(
        f"\n## (c) Model.generate, preset small ({config.n_layers} layers x {config.d_model}, "
        f"vocab {config.vocab_size}), prompt 16\n"
    )
    print("| new tokens | KVCache (s) | ConcatKVCache (s) | concat / KVCache | same tokens |")
    print("|---:|---:|---:|---:|---|")
    for new_tokens, fast, naive, same in results_c:
        print(f"| {new_tokens} | {fast:.3f} | {naive:.3f} | {naive / fast:.2f}x | {same} |")

    if _plot(results_a, n_layers, width, args.plot):
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
