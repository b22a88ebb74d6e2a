"""``python -m engine`` (or ``kvcache-xp``): the demo generation; ``python -m engine
generate --model DIR --prompt TEXT``: text from a Hugging Face model folder.

The demo generates greedily with a built-in seeded model, first through the preallocated
``KVCache``, then through the naive ``ConcatKVCache``, and prints tokens/s for
each, the cache bytes, the speed ratio, and whether both produced the same tokens
(exit status 1 if not). Bad options print a message and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import numpy as np

from kvcache_xp import BACKEND_NAMES, KVCacheError, PagedKVCache, load_backend

from .model import PRESETS, Model
from .reference import ConcatKVCache

__all__ = ["main"]


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, or a message saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine",
        description="Greedy generation with a seeded GPT-style model through the "
        "preallocated KVCache, compared with the naive concatenating cache.",
    )
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="numpy")
    parser.add_argument(
        "--cache",
        choices=("contiguous", "int8"),
        default="contiguous",
        help="contiguous: KVCache storing --cache-dtype; int8: Int8KVCache, one float32 "
        "scale per token per head (lossy: its tokens may differ from the float cache's)",
    )
    parser.add_argument(
        "--cache-dtype",
        choices=("float32", "float16", "bfloat16", "float64"),
        default="float32",
        help="storage dtype of the cache (compute is float32); float16 is not on array_api_strict",
    )
    parser.add_argument(
        "--size",
        choices=tuple(PRESETS),
        default="small",
        help="built-in model size: "
        + "; ".join(
            f"{name}: {c.n_layers} layers x {c.d_model} wide, {c.n_heads} heads, "
            f"vocab {c.vocab_size}, context {c.max_seq_len}"
            for name, c in PRESETS.items()
        ),
    )
    parser.add_argument("--prompt-len", type=_int_at_least(1), default=16, metavar="N")
    parser.add_argument("--new-tokens", type=_int_at_least(1), default=512, metavar="N")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, help="weights and prompt seed")
    parser.add_argument(
        "--no-compare", action="store_true", help="skip the ConcatKVCache run and the comparison"
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show progress")
    return parser


class Progress:
    """A one-line progress display on a stream: redrawn in place on a terminal,
    a line per quarter otherwise (logs stay readable)."""

    def __init__(self, label: str, total: int, stream: TextIO, enabled: bool = True) -> None:
        self.label, self.total, self.stream, self.enabled = label, total, stream, enabled
        self.interactive = enabled and stream.isatty()
        self.start = time.perf_counter()
        self._next_redraw = 0.0
        self._next_quarter = 1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.interactive:
            if now < self._next_redraw and done < self.total:
                return
            self._next_redraw = now + 0.1
            filled = 30 * done // self.total
            rate = done / max(now - self.start, 1e-9)
            self.stream.write(
                f"\r  {self.label:<14}[{'#' * filled}{'.' * (30 - filled)}] "
                f"{done}/{self.total} tokens  {rate:8.1f} tokens/s"
            )
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif done * 4 >= self._next_quarter * self.total:
            while done * 4 >= self._next_quarter * self.total:
                self._next_quarter += 1
            self.stream.write(f"  {self.label}: {done}/{self.total} tokens\n")
            self.stream.flush()


def _timed_generation(
    tokens: Iterator[int], label: str, total: int, show_progress: bool
) -> tuple[list[int], float, float]:
    """Drain a token iterator; return the tokens, time to first token, total time."""
    progress = Progress(label, total, sys.stderr, show_progress)
    out: list[int] = []
    start = time.perf_counter()
    first = 0.0
    for token in tokens:
        out.append(token)
        if len(out) == 1:
            first = time.perf_counter() - start
        progress.update(len(out))
    return out, first, time.perf_counter() - start


def _run_and_report(
    tokens: Iterator[int], label: str, total: int, show_progress: bool, describe_cache: Any
) -> tuple[list[int], float]:
    """Generate with progress, print one line of tokens/s and ``describe_cache()`` (after
    the run: a growing cache's size is known only then); return (tokens, seconds)."""
    out, first, elapsed = _timed_generation(tokens, label, total, show_progress)
    print(
        f"{label:<13} {len(out) / elapsed:10.1f} tokens/s  ({elapsed:.3f} s, first token "
        f"after {first * 1e3:.1f} ms)  {describe_cache()}"
    )
    return out, elapsed


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def run(args: argparse.Namespace) -> int:
    config = PRESETS[args.size]
    total = args.prompt_len + args.new_tokens
    if total - 1 > config.max_seq_len:
        raise ValueError(
            f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} needs "
            f"{total - 1} positions; the {args.size} model covers {config.max_seq_len}"
        )
    backend = load_backend(args.backend)
    model = Model(config, seed=args.seed, xp=backend.xp, device=backend.device)
    prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, args.prompt_len)
    prompt = [int(t) for t in prompt]
    lossy = args.cache == "int8"
    cache = model.make_cache(total, "int8" if lossy else args.cache_dtype)
    label = type(cache).__name__
    print(
        f"model {config.name}: {config.n_layers} layers x {config.d_model} wide, "
        f"{config.n_heads} heads, vocab {config.vocab_size} "
        f"({_megabytes(model.weight_nbytes)} of float32 weights), seed {args.seed}\n"
        f"backend {backend.name} ({backend.xp.__name__}, device {model.device}), "
        f"cache {label}" + ("" if lossy else f", dtype {args.cache_dtype}") + "\n"
        f"prompt: {args.prompt_len} random tokens; generating {args.new_tokens} new tokens"
    )
    show = not args.no_progress
    tokens, elapsed = _run_and_report(
        model.generate_stream(prompt, args.new_tokens, cache=cache), label, args.new_tokens,
        show, lambda: f"cache {_megabytes(cache.nbytes)} preallocated for {total} rows",
    )  # fmt: skip
    if args.no_compare:
        print(f"first tokens: {tokens[:16]}")
        return 0
    naive = ConcatKVCache(
        config.n_layers, config.kv_dim, args.cache_dtype, xp=backend.xp, device=backend.device
    )
    naive_tokens, naive_elapsed = _run_and_report(
        model.generate_stream(prompt, args.new_tokens, cache=naive), "ConcatKVCache",
        args.new_tokens, show,
        lambda: f"cache {_megabytes(naive.nbytes)} at the end, reallocated on every append",
    )  # fmt: skip
    print(f"speed ratio: {label} is {naive_elapsed / elapsed:.2f}x the speed of ConcatKVCache")
    same = sum(a == b for a, b in zip(tokens, naive_tokens, strict=True))
    if lossy:  # int8 is not exact: report the agreement, it is no failure
        print(
            f"same tokens as the {args.cache_dtype} ConcatKVCache: {same}/{len(tokens)} "
            "(int8 is lossy; benchmarks/README.md measures its accuracy)"
        )
        print(f"first tokens: {tokens[:16]}")
        return 0
    if same == len(tokens):
        print(f"same tokens: yes, {same}/{len(tokens)} identical")
        print(f"first tokens: {tokens[:16]}")
        return 0
    print(f"same tokens: NO, only {same}/{len(tokens)} identical", file=sys.stderr)
    return 1


def build_generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine generate",
        description="Generate text with a GPT-2 or Llama-family model from a local Hugging "
        "Face folder (config.json, model.safetensors or shards, tokenizer.json), "
        "streaming it as it comes; timings and sizes follow on stderr.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="the model folder")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs tokenizer.json and tokenizers)")
    prompt.add_argument(
        "--prompt-ids", metavar="IDS", help="prompt as comma-separated token ids; prints ids"
    )
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="numpy")
    parser.add_argument(
        "--cache",
        choices=("contiguous", "int8", "paged"),
        default="contiguous",
        help="contiguous: KVCache storing --cache-dtype; int8: Int8KVCache (one scale per "
        "token per head); paged: a PagedKVCache sequence, blocks of 16 rows",
    )
    parser.add_argument(
        "--cache-dtype", choices=("float32", "float16", "bfloat16", "float64"), default="float32"
    )
    parser.add_argument("--max-new-tokens", type=_int_at_least(1), default=64, metavar="N")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample"
    )
    parser.add_argument("--top-k", type=_int_at_least(0), default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, help="sampling seed")
    parser.add_argument(
        "--ignore-eos", action="store_true", help="do not stop at the model's EOS token(s)"
    )
    return parser


def _generation_cache(model: Model, kind: str, dtype: str, rows: int) -> Any:
    if kind == "int8":
        return model.make_cache(rows, "int8")
    if kind == "paged":
        c = model.config
        block = 16
        pool = PagedKVCache(
            c.n_layers, c.kv_dim, -(-rows // block), block, dtype, xp=model.xp,
            device=model.device, max_seq_len=rows,
        )  # fmt: skip
        return pool.add_sequence()
    return model.make_cache(rows, dtype)


def run_generate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .text import load_tokenizer

    backend = load_backend(args.backend)
    start = time.perf_counter()
    model = load_model(args.model, xp=backend.xp, device=backend.device)
    load_seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(args.model) if args.prompt is not None else None
    if tokenizer is not None:
        prompt = tokenizer.encode(args.prompt)
        if not prompt:
            raise ValueError("the prompt encodes to no tokens")
    else:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",")]
        except ValueError:
            raise ValueError(
                f"--prompt-ids: expected comma-separated ints, got {args.prompt_ids!r}"
            ) from None
    c = model.config
    new = min(args.max_new_tokens, c.max_seq_len - len(prompt) + 1)
    if new < 1:
        raise ValueError(
            f"the prompt's {len(prompt)} tokens fill the model's context {c.max_seq_len}"
        )
    if new < args.max_new_tokens:
        print(
            f"--max-new-tokens {args.max_new_tokens} clipped to {new}: the model's context "
            f"is {c.max_seq_len} positions",
            file=sys.stderr,
        )
    cache = _generation_cache(model, args.cache, args.cache_dtype, len(prompt) + new)
    print(
        f"{model.path}: {c.arch}, {c.n_layers} layers x {c.d_model}, {c.n_heads} heads "
        f"({c.n_kv_heads} kv), vocab {c.vocab_size}; loaded in {load_seconds:.2f} s on "
        f"{backend.name}; cache {type(cache).__name__}; prompt {len(prompt)} tokens",
        file=sys.stderr,
    )
    tokens = model.generate_stream(
        prompt, new, cache=cache, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, eos_token_id=() if args.ignore_eos else None,
    )  # fmt: skip
    stream = tokenizer.stream(prompt) if tokenizer is not None else None
    out = sys.stdout
    if stream is not None:
        out.write(args.prompt)
        out.flush()
    count, start, first = 0, time.perf_counter(), 0.0
    for token in tokens:
        count += 1
        if count == 1:
            first = time.perf_counter() - start
        out.write(stream.push(token) if stream is not None else f"{token} ")
        out.flush()
    total = time.perf_counter() - start
    out.write((stream.flush() if stream is not None else "") + "\n")
    out.flush()
    decode = (count - 1) / (total - first) if count > 1 and total > first else float("nan")
    print(
        f"time to first token {first * 1e3:.1f} ms (prompt {len(prompt)} tokens); "
        f"decode {decode:.1f} tokens/s ({count} tokens); "
        f"cache {_megabytes(cache.nbytes)}; weights {_megabytes(model.weight_nbytes)}",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:
        parser, runner = build_generate_parser(), run_generate
        argv = argv[1:]
    else:
        parser, runner = build_parser(), run
    args = parser.parse_args(argv)
    try:
        return runner(args)
    except (KVCacheError, ValueError, TypeError, ImportError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
