"""Accuracy, memory and speed of the INT8 KV cache against float32 (and float16).

On the built-in default model (preset ``small``) over several seeds:

1. accuracy, for several scale granularities (group sizes):
   - greedy-token agreement with the float32 cache over 256 generated tokens, both
     teacher-forced (the share of positions whose argmax agrees, llama.cpp's "same
     top") and free-running (the share of equal tokens at equal positions of two
     independent generations, and the first position where they differ);
   - KL(float32 || quantized) of next-token distributions, teacher-forced on the
     float32 generation (llama.cpp's metric), mean and max;
   - the largest float32 top-1/top-2 logit gap at which a teacher-forced flip
     happened (how near a tie the flips are);
2. the relative error of attention outputs, same inputs, float32 cache rows against
   int8 rows (dequantized, and scale-folded);
3. memory: bytes per token against float32 and float16, scales included;
4. speed: decode tokens/s with the float32 cache, the int8 cache read through
   ``append`` (dequantized copies) and through ``append_quantized`` (scales folded).

    python benchmarks/bench_int8.py            # about a minute here
    python benchmarks/bench_int8.py --quick
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from engine.model import PRESETS, Model
from kvcache_xp import Int8KVCache, KVCache, load_backend, to_numpy
from kvcache_xp.int8 import dequantize, quantize


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class DequantizingReader:
    """An ``Int8KVCache`` seen only through ``append``: the model then reads
    dequantized copies (the generic path) instead of folding the scales."""

    def __init__(self, cache: Int8KVCache) -> None:
        self.append, self.get_seq_length = cache.append, cache.get_seq_length


class AttentionProbe(Model):
    """A Model that records the inputs and output of some attention calls."""

    record_every = 0
    records: list

    def _attention(self, q, keys, values, start):
        out = super()._attention(q, keys, values, start)
        if self.record_every and start % self.record_every == 0 and q.shape[0] == 1:
            self.records.append((q, to_numpy(keys), to_numpy(values), start, to_numpy(out)))
        return out


def teacher_forced_logits(model, prompt, tokens, cache) -> np.ndarray:
    """Next-token logits (len(tokens), vocab) along a fixed sequence through ``cache``."""
    logits = [to_numpy(model.prefill(prompt, cache))]
    logits += [to_numpy(model.decode_step(t, cache)) for t in tokens[:-1]]
    return np.stack(logits)


def measure_accuracy(backend, config, seeds, prompt_len, new_tokens, variants):
    rows = {name: [] for name in variants}
    for seed in seeds:
        model = Model(config, seed=seed, xp=backend.xp, device=backend.device)
        rng = np.random.default_rng(1000 + seed)
        prompt = [int(t) for t in rng.integers(0, config.vocab_size, prompt_len)]
        capacity = prompt_len + new_tokens
        reference = model.generate(prompt, new_tokens)
        ref_logits = teacher_forced_logits(model, prompt, reference, model.make_cache(capacity))
        ref_logp = _log_softmax(ref_logits)
        top2 = np.sort(ref_logits, axis=-1)[:, -2:]
        gaps = top2[:, 1] - top2[:, 0]
        for name, make in variants.items():
            logits = teacher_forced_logits(model, prompt, reference, make(model, capacity))
            kl = (np.exp(ref_logp) * (ref_logp - _log_softmax(logits))).sum(axis=-1)
            flips = ref_logits.argmax(-1) != logits.argmax(-1)
            free = model.generate(prompt, new_tokens, cache=make(model, capacity))
            same = [a == b for a, b in zip(reference, free, strict=True)]
            rows[name].append(
                {
                    "kl_mean": float(kl.mean()),
                    "kl_max": float(kl.max()),
                    "same_top": 1.0 - float(flips.mean()),
                    "free_same": float(np.mean(same)),
                    "first_diff": same.index(False) if False in same else new_tokens,
                    "flip_gap": float(gaps[flips].max()) if flips.any() else 0.0,
                    "near_ties": float((gaps < 0.05).mean()),
                }
            )
    return rows


def measure_attention_error(backend, config, seed, prompt_len, new_tokens, group_size):
    xp = backend.xp
    model = AttentionProbe(config, seed=seed, xp=xp, device=backend.device)
    model.records, model.record_every = [], 32
    prompt = [
        int(t) for t in np.random.default_rng(seed).integers(0, config.vocab_size, prompt_len)
    ]
    model.generate(prompt, new_tokens)
    model.record_every = 0
    dequantized, folded, paths = [], [], []
    for q, keys, values, start, out in model.records:
        k_host, v_host = (
            xp.asarray(keys, device=backend.device),
            xp.asarray(values, device=backend.device),
        )
        qk, sk = quantize(xp, k_host, group_size)
        qv, sv = quantize(xp, v_host, group_size)
        via_copies = to_numpy(
            model._attention(
                q, dequantize(xp, qk, sk, xp.float32), dequantize(xp, qv, sv, xp.float32), start
            )
        )
        via_folding = to_numpy(model._attention_int8(q, qk, sk, qv, sv, start))
        norm = np.linalg.norm(out)
        dequantized.append(np.linalg.norm(via_copies - out) / norm)
        folded.append(np.linalg.norm(via_folding - out) / norm)
        paths.append(np.linalg.norm(via_folding - via_copies) / norm)
    return np.array(dequantized), np.array(folded), np.array(paths)


def measure_speed(backend, config, contexts, steps):
    model = Model(config, seed=0, xp=backend.xp, device=backend.device)
    c = config
    makers = {
        "float32 KVCache": lambda n: KVCache(
            c.n_layers, c.d_model, n, xp=backend.xp, device=backend.device
        ),
        "int8, append (dequantized copies)": lambda n: DequantizingReader(
            model.make_cache(n, "int8")
        ),
        "int8, append_quantized (scales folded)": lambda n: model.make_cache(n, "int8"),
    }
    rng = np.random.default_rng(0)
    table = {}
    for context in contexts:
        prompt = [int(t) for t in rng.integers(0, c.vocab_size, context)]
        for name, make in makers.items():
            timings = []
            for _ in range(3):
                cache = make(context + steps)
                model.prefill(prompt, cache)
                start = time.perf_counter()
                for t in range(steps):
                    model.decode_step(t % c.vocab_size, cache)
                timings.append(time.perf_counter() - start)
            table[(context, name)] = steps / statistics.median(timings)
    return list(makers), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    backend = load_backend(args.backend)
    config = PRESETS["small"]
    seeds = range(2) if args.quick else range(8)
    new_tokens = 32 if args.quick else 256
    head_dim = config.head_dim

    def int8(group_size):
        return lambda model, n: Int8KVCache(
            config.n_layers, config.d_model, n, xp=backend.xp, device=backend.device,
            group_size=group_size,
        )  # fmt: skip

    variants = {"float16 KVCache": lambda model, n: model.make_cache(n, "float16")}
    variants |= {f"int8, group {g}": int8(g) for g in (16, 32, head_dim, config.d_model)}
    if not hasattr(backend.xp, "float16"):
        del variants["float16 KVCache"]

    print(f"# INT8 KV cache on {backend.name}")
    print(
        f"machine: {platform.machine()}, python {platform.python_version()}, "
        f"numpy {np.__version__}; "
        f"model preset small: {config.n_layers} layers x {config.d_model}, {config.n_heads} heads "
        f"(head_dim {head_dim}), vocab {config.vocab_size}; seeds {list(seeds)}; prompt 16 "
        f"random tokens; {new_tokens} generated tokens\n"
    )

    print("## Memory: bytes per token (all layers, K and V, scales included)\n")
    print("| cache | bytes/token | vs float32 | vs float16 |")
    print("|---|---:|---:|---:|")
    f32 = 2 * config.n_layers * config.d_model * 4
    sizes = {"float32": f32, "float16": f32 // 2}
    for g in (16, 32, head_dim, config.d_model):
        sizes[f"int8, group {g}"] = 2 * config.n_layers * (config.d_model + 4 * config.d_model // g)
    for name, nbytes in sizes.items():
        print(f"| {name} | {nbytes} | {nbytes / f32:.4f} | {nbytes / (f32 // 2):.4f} |")

    rows = measure_accuracy(backend, config, seeds, 16, new_tokens, variants)
    print(f"\n## Accuracy against the float32 cache, mean over {len(seeds)} seeds\n")
    print(
        "| cache | KL mean (nats) | KL max | same top-1, teacher-forced | same token, free-running "
        "| first difference (median position) | largest top-2 gap at a flip |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, per_seed in rows.items():
        mean = {key: float(np.mean([r[key] for r in per_seed])) for key in per_seed[0]}
        first = statistics.median(r["first_diff"] for r in per_seed)
        print(
            f"| {name} | {mean['kl_mean']:.2e} | {max(r['kl_max'] for r in per_seed):.2e} "
            f"| {mean['same_top']:.2%} | {mean['free_same']:.2%} | {first:.0f} "
            f"| {max(r['flip_gap'] for r in per_seed):.3f} |"
        )
    near = np.mean([r["near_ties"] for r in next(iter(rows.values()))])
    print(f"\nShare of float32 positions whose top-1 and top-2 logits are within 0.05: {near:.1%}")

    dequantized, folded, paths = measure_attention_error(
        backend, config, 0, 16, new_tokens, head_dim
    )
    print(
        f"\n## Attention output relative error, group {head_dim} (per token per head), "
        f"{len(dequantized)} attention calls\n"
    )
    print("| int8 path | mean | max |")
    print("|---|---:|---:|")
    print(f"| dequantized copies | {dequantized.mean():.2e} | {dequantized.max():.2e} |")
    print(f"| scales folded | {folded.mean():.2e} | {folded.max():.2e} |")
    print(f"| folded vs dequantized (same int8 data) | {paths.mean():.2e} | {paths.max():.2e} |")

    contexts = [128, 512] if args.quick else [128, 1024, 1984]
    names, speed = measure_speed(backend, config, contexts, 16 if args.quick else 64)
    print(
        "\n## Decode speed (tokens/s, median of 3 runs of 64 steps after a prefill of `context`)\n"
    )
    print("| context | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for context in contexts:
        cells = " | ".join(f"{speed[(context, name)]:.0f}" for name in names)
        print(f"| {context} | {cells} |")


if __name__ == "__main__":
    main()
