"""A small GPT-style decoder that drives a KV cache the way production engines do.

Token and learned position embeddings, pre-LayerNorm blocks of multi-head causal
self-attention and a GELU MLP, a final LayerNorm and an LM head (the GPT-2 shape:
Radford et al. 2019; nanoGPT's ``model.py``; picoGPT's ``gpt2.py``).

Weights come from a seed through NumPy's Generator on the host, then move to the
backend, so every backend runs the same weights and produces the same tokens.
Computation is float32; the cache may store another floating dtype (float16), and
attention upcasts the rows it reads.

Written only against the Python array API standard: it runs on NumPy, CuPy,
PyTorch and array-api-strict. ``forward`` recomputes everything with no cache and
is the oracle every cache is checked against.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kvcache_xp import Int8KVCache, KVCache, get_namespace

__all__ = ["PRESETS", "Cache", "Model", "ModelConfig"]


class Cache(Protocol):
    """What the model needs of a cache: ``KVCache`` and ``ConcatKVCache`` both fit."""

    def append(self, layer_idx: int, k: Any, v: Any) -> tuple[Any, Any]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder."""

    vocab_size: int  # token ids are 0..vocab_size-1
    d_model: int  # residual width; also the cache row width
    n_layers: int  # transformer blocks, one cache layer each
    n_heads: int  # attention heads; d_model must divide evenly
    max_seq_len: int  # positions the learned position table covers
    d_ff: int = 0  # MLP hidden width; 0 means 4 * d_model
    layer_norm_eps: float = 1e-5
    init_scale: float = 1.0  # multiplies the standard deviation of every weight
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        if isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int) or self.d_ff < 0:
            raise ValueError(f"ModelConfig.d_ff must be an int >= 0, got {self.d_ff!r}")
        if not self.layer_norm_eps > 0 or not self.init_scale > 0:
            raise ValueError("ModelConfig.layer_norm_eps and init_scale must be > 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.d_ff or 4 * self.d_model


#: Built-in model sizes for the CLI and benchmarks; "small" is the default.
PRESETS = {
    "tiny": ModelConfig(256, 64, 2, 2, 512, name="tiny"),
    "small": ModelConfig(1024, 256, 4, 4, 2048, name="small"),
    "medium": ModelConfig(4096, 512, 8, 8, 4096, name="medium"),
    "gpt2": ModelConfig(50257, 768, 12, 12, 1024, name="gpt2"),
}


def _init_weights(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Float32 host weights from ``seed``.

    The scales are larger than GPT-2's 0.02 on purpose: at 0.02 an untrained model
    is near uniform and greedy decoding repeats one token, which would prove
    nothing about a cache. Here embeddings have unit variance, every projection
    ``1/sqrt(fan_in)``, and the query/key projections an extra factor so attention
    is sharp: the next token depends on which past rows the cache returns.
    """
    rng = np.random.default_rng(seed)
    d, h, s = config.d_model, config.hidden_dim, config.init_scale

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std * s)).astype(
            np.float32
        )

    weights = {
        "wte": normal((config.vocab_size, d), 1.0),
        "wpe": normal((config.max_seq_len, d), 1.0),
        "ln_f.g": np.ones(d, np.float32),
        "ln_f.b": np.zeros(d, np.float32),
        "lm_head": normal((d, config.vocab_size), 2.0 / math.sqrt(d)),
    }
    for i in range(config.n_layers):
        qk_gain = 2.0  # sharper attention scores than plain 1/sqrt(d)
        w_qkv = np.concatenate(
            [
                normal((d, d), qk_gain / math.sqrt(d)),
                normal((d, d), qk_gain / math.sqrt(d)),
                normal((d, d), 1.0 / math.sqrt(d)),
            ],
            axis=1,
        )
        weights |= {
            f"h{i}.ln_1.g": np.ones(d, np.float32),
            f"h{i}.ln_1.b": np.zeros(d, np.float32),
            f"h{i}.attn.w_qkv": w_qkv,  # (d, 3d): q | k | v
            f"h{i}.attn.b_qkv": normal((3 * d,), 0.1),
            f"h{i}.attn.w_out": normal((d, d), 1.0 / math.sqrt(d)),
            f"h{i}.attn.b_out": normal((d,), 0.1),
            f"h{i}.ln_2.g": np.ones(d, np.float32),
            f"h{i}.ln_2.b": np.zeros(d, np.float32),
            f"h{i}.mlp.w_in": normal((d, h), 1.0 / math.sqrt(d)),
            f"h{i}.mlp.b_in": normal((h,), 0.1),
            f"h{i}.mlp.w_out": normal((h, d), 1.0 / math.sqrt(h)),
            f"h{i}.mlp.b_out": normal((d,), 0.1),
        }
    return weights


class Model:
    """GPT-style decoder over any array API backend.

    ``Model(config, *, seed=0, xp=None, device=None)``: ``xp`` is the namespace
    (``numpy`` when ``None``), ``device`` where the weights live.
    """

    def __init__(
        self, config: ModelConfig, *, seed: int = 0, xp: Any = None, device: Any = None
    ) -> None:
        self.config = config
        self.xp = xp = get_namespace(xp)
        self.weights = {
            name: xp.asarray(value, device=device)
            for name, value in _init_weights(config, seed).items()
        }
        self.device = self.weights["wte"].device
        self.float32 = xp.float32
        self._scale = 1.0 / math.sqrt(config.head_dim)
        self._neg_inf = xp.asarray(-math.inf, dtype=xp.float32, device=self.device)
        self._layers = [
            {
                key.split(".", 1)[1]: value
                for key, value in self.weights.items()
                if key.startswith(f"h{i}.")
            }
            for i in range(config.n_layers)
        ]

    @property
    def weight_nbytes(self) -> int:
        return sum(math.prod(w.shape) * 4 for w in self.weights.values())

    # -- building blocks ----------------------------------------------------------

    def _layer_norm(self, x: Any, gain: Any, bias: Any) -> Any:
        xp = self.xp
        mean = xp.mean(x, axis=-1, keepdims=True)
        centered = x - mean
        variance = xp.mean(centered * centered, axis=-1, keepdims=True)
        return centered / xp.sqrt(variance + self.config.layer_norm_eps) * gain + bias

    def _gelu(self, x: Any) -> Any:
        # the tanh approximation of GELU, as GPT-2 uses (erf is not in the standard)
        return 0.5 * x * (1.0 + self.xp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))

    def _causal_softmax(self, scores: Any, start: int) -> Any:
        """scores (H, T, S) of queries at positions [start, start+T) -> probabilities."""
        xp = self.xp
        t, s = scores.shape[-2], scores.shape[-1]
        if t > 1:  # prefill: query i sees keys 0..start+i; one decode row sees them all
            query_pos = xp.reshape(xp.arange(start, start + t, device=self.device), (t, 1))
            key_pos = xp.reshape(xp.arange(s, device=self.device), (1, s))
            scores = xp.where(key_pos <= query_pos, scores, self._neg_inf)
        scores = scores - xp.max(scores, axis=-1, keepdims=True)
        probs = xp.exp(scores)
        return probs / xp.sum(probs, axis=-1, keepdims=True)

    def _attention(self, q: Any, keys: Any, values: Any, start: int) -> Any:
        """Causal multi-head attention of T queries at positions [start, start+T).

        q: (T, d) float32; keys, values: (S, d) in the cache dtype, S = start + T.
        """
        xp, n_heads, head_dim = self.xp, self.config.n_heads, self.config.head_dim
        t, s = q.shape[0], keys.shape[0]
        if keys.dtype != self.float32:  # a float16 cache: compute in float32
            keys = xp.astype(keys, self.float32)
            values = xp.astype(values, self.float32)
        qh = xp.permute_dims(xp.reshape(q, (t, n_heads, head_dim)), (1, 0, 2))  # (H, T, hd)
        kh = xp.permute_dims(xp.reshape(keys, (s, n_heads, head_dim)), (1, 2, 0))  # (H, hd, S)
        vh = xp.permute_dims(xp.reshape(values, (s, n_heads, head_dim)), (1, 0, 2))  # (H, S, hd)
        probs = self._causal_softmax(xp.matmul(qh, kh) * self._scale, start)  # (H, T, S)
        out = xp.matmul(probs, vh)  # (H, T, hd)
        return xp.reshape(xp.permute_dims(out, (1, 0, 2)), (t, n_heads * head_dim))  # (T, d)

    def _attention_int8(
        self, q: Any, q_keys: Any, key_scales: Any, q_values: Any, value_scales: Any, start: int
    ) -> Any:
        """Attention straight from int8 rows, the scales folded in (no dequantized copy).

        q: (T, d) float32; q_keys, q_values: (S, d) int8; key_scales, value_scales:
        (S, G) float32, one per group of g = d / G elements, G a multiple of H. Per
        group, q . k = scale_k * (q . q_k), and sum_s p_s v_s = sum_s (p_s scale_v) q_v.
        """
        xp, n_heads = self.xp, self.config.n_heads
        t, s = q.shape[0], q_keys.shape[0]
        n_groups = key_scales.shape[1]
        g, per_head = self.config.d_model // n_groups, n_groups // n_heads
        qg = xp.permute_dims(xp.reshape(q, (t, n_groups, g)), (1, 0, 2))  # (G, T, g)
        kg = xp.reshape(xp.astype(q_keys, self.float32), (s, n_groups, g))
        kg = xp.permute_dims(kg, (1, 2, 0))  # (G, g, S)
        k_scale = xp.reshape(xp.permute_dims(key_scales, (1, 0)), (n_groups, 1, s))
        partial = xp.matmul(qg, kg) * k_scale  # (G, T, S): each group's share of q . k
        scores = xp.sum(xp.reshape(partial, (n_heads, per_head, t, s)), axis=1)  # (H, T, S)
        probs = self._causal_softmax(scores * self._scale, start)  # (H, T, S)
        v_scale = xp.reshape(xp.permute_dims(value_scales, (1, 0)), (n_heads, per_head, 1, s))
        pg = xp.reshape(xp.reshape(probs, (n_heads, 1, t, s)) * v_scale, (n_groups, t, s))
        vg = xp.reshape(xp.astype(q_values, self.float32), (s, n_groups, g))
        out = xp.matmul(pg, xp.permute_dims(vg, (1, 0, 2)))  # (G, T, g)
        return xp.reshape(xp.permute_dims(out, (1, 0, 2)), (t, self.config.d_model))  # (T, d)

    def _read_cache(self, cache: Cache, layer_idx: int, q: Any, k: Any, v: Any, start: int) -> Any:
        """Append k, v to one sequence's cache and attend q over what it holds.

        An int8 cache whose scale groups fit in a head is read through
        ``append_quantized`` by the scale-folding attention; any other cache
        through ``append`` and the views (or copies) it returns.
        """
        if hasattr(cache, "append_quantized") and self.config.head_dim % cache.group_size == 0:
            return self._attention_int8(q, *cache.append_quantized(layer_idx, k, v), start)
        return self._attention(q, *cache.append(layer_idx, k, v), start)

    def _blocks(
        self,
        x: Any,
        starts: list[int],
        caches: Sequence[Cache] | None,
        decode: bool,
        batch_invariant: bool = True,
    ) -> Any:
        """Run every block on x: (T, d); return (T, d).

        - ``caches is None``: the full recompute; x is one sequence at positions
          [0, T) and attention reads this call's own k, v.
        - ``decode``: row i of x is the next token of the sequence in ``caches[i]``,
          at position ``starts[i]``; each cache gets one ``(d,)`` append per layer.
          Projections and MLP run batched over the rows (``batch_invariant``: as
          stacked one-row products, see ``_matmul_rows``), attention per sequence.
        - else (prefill): x is one sequence at positions [starts[0], starts[0] + T),
          appended to ``caches[0]`` as one ``(T, d)`` call per layer.
        """
        xp, d = self.xp, self.config.d_model
        matmul = self._matmul_rows if decode and batch_invariant else xp.matmul
        for layer_idx, w in enumerate(self._layers):
            h = self._layer_norm(x, w["ln_1.g"], w["ln_1.b"])
            qkv = matmul(h, w["attn.w_qkv"]) + w["attn.b_qkv"]  # (T, 3d)
            q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]  # (T, d) each
            if caches is None:
                attn = self._attention(q, k, v, starts[0])
            elif not decode:
                attn = self._read_cache(caches[0], layer_idx, q, k, v, starts[0])
            elif len(caches) == 1:  # one decode row: the contract's (d,) append
                attn = self._read_cache(caches[0], layer_idx, q, k[0, :], v[0, :], starts[0])
            else:
                attn = xp.concat(
                    [
                        self._read_cache(cache, layer_idx, q[i : i + 1, :], k[i, :], v[i, :], start)
                        for i, (cache, start) in enumerate(zip(caches, starts, strict=True))
                    ],
                    axis=0,
                )  # (B, d)
            x = x + matmul(attn, w["attn.w_out"]) + w["attn.b_out"]
            h = self._layer_norm(x, w["ln_2.g"], w["ln_2.b"])
            h = self._gelu(matmul(h, w["mlp.w_in"]) + w["mlp.b_in"])  # (T, 4d)
            x = x + matmul(h, w["mlp.w_out"]) + w["mlp.b_out"]
        return x

    def _matmul_rows(self, x: Any, w: Any) -> Any:
        """x (B, d_in) @ w (d_in, d_out) as B stacked (1, d_in) products: (B, d_out).

        Decoding uses this, alone or batched, so that a sequence's row is computed
        by the same (1, d_in) product whatever else is in the batch: BLAS computes a
        (B, d_in) product by other kernels for different B, which changes the last
        bits and can flip a greedy token at a near tie. NumPy (and array-api-strict)
        evaluate a stacked matmul one 2-D product at a time, so there batched
        decoding reproduces solo decoding exactly. PyTorch folds the stack into one
        (B, d_in) product: there the two agree to float32 rounding.
        """
        b, d_in = x.shape
        return self.xp.reshape(self.xp.matmul(self.xp.reshape(x, (b, 1, d_in)), w), (b, w.shape[1]))

    def _logits(self, x: Any, rowwise: bool = False) -> Any:
        x = self._layer_norm(x, self.weights["ln_f.g"], self.weights["ln_f.b"])
        return (self._matmul_rows if rowwise else self.xp.matmul)(x, self.weights["lm_head"])

    # -- validation (once per call, never per layer) -------------------------------

    def _check_tokens(self, tokens: Sequence[int], what: str) -> list[int]:
        try:
            tokens = [operator.index(t) for t in tokens]
        except TypeError:
            raise TypeError(f"{what} must be a sequence of ints") from None
        if not tokens:
            raise ValueError(f"{what} must hold at least one token")
        bad = [t for t in tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"{what} has token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})"
            )
        return tokens

    def _check_room(self, start: int, count: int) -> None:
        if start + count > self.config.max_seq_len:
            raise ValueError(
                f"positions {start}..{start + count - 1} pass the model's max_seq_len="
                f"{self.config.max_seq_len} (the position table's size)"
            )

    # -- the public contract --------------------------------------------------------

    def forward(self, tokens: Sequence[int]) -> Any:
        """Full causal recompute with no cache: tokens (T,) -> logits (T, vocab) float32."""
        tokens = self._check_tokens(tokens, "tokens")
        self._check_room(0, len(tokens))
        return self._logits(self._blocks(self._embed(tokens, 0), [0], None, decode=False))

    def prefill(self, prompt: Sequence[int], cache: Cache) -> Any:
        """Append the prompt's k, v (one ``(T, d)`` call per layer); return the last
        position's logits, (vocab,) float32. The prompt continues whatever the
        cache already holds."""
        prompt = self._check_tokens(prompt, "prompt")
        start = cache.get_seq_length(0)
        self._check_room(start, len(prompt))
        x = self._blocks(self._embed(prompt, start), [start], [cache], decode=False)
        return self._logits(x[-1, :])

    def decode_step(self, token: int, cache: Cache) -> Any:
        """Append one token's k, v (one ``(d,)`` call per layer); return its logits,
        (vocab,) float32."""
        (token,) = self._check_tokens([token], "token")
        start = cache.get_seq_length(0)
        self._check_room(start, 1)
        x = self.weights["wte"][token : token + 1, :] + self.weights["wpe"][start : start + 1, :]
        return self._logits(self._blocks(x, [start], [cache], decode=True), rowwise=True)[0, :]

    def decode_batch(
        self, tokens: Sequence[int], caches: Sequence[Cache], *, batch_invariant: bool = True
    ) -> Any:
        """One decode step of B sequences together: token i is the next token of the
        sequence whose cache is ``caches[i]``; returns logits (B, vocab) float32.

        Attention runs per sequence over its own cache (one ``(d,)`` append per
        layer each); the projections, the MLP and the LM head run on all B rows.
        ``batch_invariant=True`` computes them as B stacked one-row products, the
        very products ``decode_step`` computes, so each row is what decoding that
        sequence alone gives (bit for bit on NumPy and array-api-strict; see
        ``_matmul_rows``). ``False`` uses (B, d) matmuls: the weights are read once
        for the whole batch, much faster, and rows agree with solo decoding to
        float32 rounding, which can flip a greedy token at a near tie.
        """
        tokens = self._check_tokens(tokens, "tokens")
        if len(tokens) != len(caches):
            raise ValueError(f"{len(tokens)} tokens but {len(caches)} caches: one each")
        starts = [cache.get_seq_length(0) for cache in caches]
        for start in starts:
            self._check_room(start, 1)
        xp = self.xp
        ids = xp.asarray(tokens, dtype=xp.int64, device=self.device)
        positions = xp.asarray(starts, dtype=xp.int64, device=self.device)
        x = xp.take(self.weights["wte"], ids, axis=0) + xp.take(
            self.weights["wpe"], positions, axis=0
        )
        x = self._blocks(x, starts, caches, decode=True, batch_invariant=batch_invariant)
        return self._logits(x, rowwise=batch_invariant)  # (B, vocab)

    def _embed(self, tokens: list[int], start: int) -> Any:
        xp = self.xp
        ids = xp.asarray(tokens, dtype=xp.int64, device=self.device)
        wpe = self.weights["wpe"][start : start + len(tokens), :]
        return xp.take(self.weights["wte"], ids, axis=0) + wpe  # (T, d)

    def make_cache(self, max_seq_len: int, dtype: Any = "float32") -> KVCache | Int8KVCache:
        """A cache shaped for this model, on its backend and device.

        ``dtype`` is a floating dtype (a ``KVCache`` storing it) or ``"int8"`` (an
        ``Int8KVCache`` with one scale per token per head).
        """
        c = self.config
        if isinstance(dtype, str) and dtype == "int8":
            return Int8KVCache(
                c.n_layers, c.d_model, max_seq_len, xp=self.xp, device=self.device,
                group_size=c.head_dim,
            )  # fmt: skip
        return KVCache(c.n_layers, c.d_model, max_seq_len, dtype, xp=self.xp, device=self.device)

    def generate_stream(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        cache: Cache | None = None,
        cache_dtype: Any = "float32",
    ) -> Iterator[int]:
        """Greedy decoding: an iterator over the new tokens, each as it is chosen.

        Bad arguments raise here, before the iterator is returned.
        Without ``cache``, builds ``KVCache(n_layers, d_model, len(prompt) +
        max_new_tokens, cache_dtype)`` (``cache_dtype="int8"``: an ``Int8KVCache``,
        see ``make_cache``). A cache passed in is used as it is: the prompt
        continues whatever it already holds.
        """
        prompt = self._check_tokens(prompt, "prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        start = 0 if cache is None else cache.get_seq_length(0)
        # the last new token is returned, never fed back: it needs no position
        self._check_room(start, len(prompt) + max(max_new_tokens - 1, 0))
        if cache is None:
            cache = self.make_cache(len(prompt) + max_new_tokens, cache_dtype)
        return self._greedy(prompt, max_new_tokens, cache)

    def _greedy(self, prompt: list[int], max_new_tokens: int, cache: Cache) -> Iterator[int]:
        if max_new_tokens == 0:
            return
        argmax = self.xp.argmax
        token = int(argmax(self.prefill(prompt, cache)))
        yield token
        for _ in range(max_new_tokens - 1):
            token = int(argmax(self.decode_step(token, cache)))
            yield token

    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        cache: Cache | None = None,
        cache_dtype: Any = "float32",
    ) -> list[int]:
        """Greedy decoding; returns the ``max_new_tokens`` new tokens only."""
        return list(
            self.generate_stream(prompt, max_new_tokens, cache=cache, cache_dtype=cache_dtype)
        )
