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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kvcache_xp import Int8KVCache, KVCache, get_namespace

from .sampling import Sampler, SamplingParams

__all__ = ["PRESETS", "Cache", "Model", "ModelConfig", "RopeScaling", "weight_shapes"]


class Cache(Protocol):
    """What the model needs of a cache: ``KVCache`` and ``ConcatKVCache`` both fit."""

    def append(self, layer_idx: int, k: Any, v: Any) -> tuple[Any, Any]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


@dataclass(frozen=True)
class RopeScaling:
    """``rope_scaling`` of type ``llama3`` (Llama 3.1 and later): long wavelengths are
    stretched by ``factor``, short ones kept, the band between interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


ARCHITECTURES = ("gpt2", "llama")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder.

    ``arch="gpt2"`` (the default): learned positions, LayerNorm with biases, a fused
    q|k|v projection with biases, the tanh-GELU MLP. ``arch="llama"``: rotary
    positions (``rope_theta``, optional ``rope_scaling``), RMSNorm, a SwiGLU MLP, no
    biases unless ``qkv_bias`` / ``out_bias``, grouped-query attention with
    ``n_kv_heads`` key/value heads.
    """

    vocab_size: int  # token ids are 0..vocab_size-1
    d_model: int  # residual width
    n_layers: int  # transformer blocks, one cache layer each
    n_heads: int  # query heads
    max_seq_len: int  # longest context (gpt2: the position table's size)
    d_ff: int = 0  # MLP hidden width; 0 means 4 * d_model
    layer_norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon
    init_scale: float = 1.0  # multiplies the standard deviation of every seeded weight
    name: str = field(default="custom", compare=False)
    arch: str = "gpt2"
    n_kv_heads: int = 0  # key/value heads; 0 means n_heads (no grouping)
    head_dim: int = 0  # 0 means d_model // n_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False  # llama: biases on q, k, v (Qwen2; Llama's attention_bias)
    out_bias: bool = False  # llama: a bias on the output projection (attention_bias)
    tie_word_embeddings: bool = False  # the LM head is the token embedding

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        for name in ("d_ff", "n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be an int >= 0, got {value!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if not self.head_dim:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"ModelConfig.d_model={self.d_model} must be divisible by "
                    f"n_heads={self.n_heads} (or give head_dim)"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if not self.n_kv_heads:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be a multiple of "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.arch == "gpt2":
            if self.n_kv_heads != self.n_heads or self.head_dim * self.n_heads != self.d_model:
                raise ValueError(
                    "arch 'gpt2' has n_kv_heads == n_heads and head_dim * n_heads == d_model"
                )
            if self.rope_scaling is not None or self.qkv_bias or self.out_bias:
                raise ValueError("rope_scaling, qkv_bias and out_bias belong to arch 'llama'")
        elif self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if not self.layer_norm_eps > 0 or not self.init_scale > 0 or not self.rope_theta > 0:
            raise ValueError("ModelConfig.layer_norm_eps, init_scale and rope_theta must be > 0")

    @property
    def hidden_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def q_dim(self) -> int:
        """Width of the queries (and of the attention output): n_heads * head_dim."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of one key (or value) row, the cache's row width: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim


#: Built-in model sizes for the CLI and benchmarks; "small" is the default.
PRESETS = {
    "tiny": ModelConfig(256, 64, 2, 2, 512, name="tiny"),
    "small": ModelConfig(1024, 256, 4, 4, 2048, name="small"),
    "medium": ModelConfig(4096, 512, 8, 8, 4096, name="medium"),
    "gpt2": ModelConfig(50257, 768, 12, 12, 1024, name="gpt2"),
}


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the model holds, by internal name, with its shape.

    Matrices are stored (out_features, in_features), as Hugging Face's ``nn.Linear``
    stores them, and applied as ``x @ W.T`` (measured faster on NumPy than the
    (in, out) layout for one-row decoding: ``benchmarks/bench_decode.py``). Llama's
    q, k, v projections are fused into one matrix, as are gate and up.
    """
    c = config
    d, f, qd, kvd = c.d_model, c.hidden_dim, c.q_dim, c.kv_dim
    gpt2 = c.arch == "gpt2"
    shapes: dict[str, tuple[int, ...]] = {"wte": (c.vocab_size, d), "ln_f.g": (d,)}
    if gpt2:
        shapes |= {"wpe": (c.max_seq_len, d), "ln_f.b": (d,)}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (c.vocab_size, d)
    for i in range(c.n_layers):
        layer = {
            "ln_1.g": (d,),
            "attn.w_qkv": (qd + 2 * kvd, d),  # q | k | v
            "attn.w_out": (d, qd),
            "ln_2.g": (d,),
            "mlp.w_out": (d, f),
        }
        if gpt2:
            layer |= {"ln_1.b": (d,), "ln_2.b": (d,), "mlp.w_in": (f, d), "mlp.b_in": (f,)}
            layer |= {"mlp.b_out": (d,)}
        else:
            layer["mlp.w_gate_up"] = (2 * f, d)  # gate | up
        if gpt2 or c.qkv_bias:
            layer["attn.b_qkv"] = (qd + 2 * kvd,)
        if gpt2 or c.out_bias:
            layer["attn.b_out"] = (d,)
        shapes |= {f"h{i}.{key}": shape for key, shape in layer.items()}
    return shapes


def _init_weights(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Float32 host weights from ``seed``.

    The scales are larger than GPT-2's 0.02 on purpose: at 0.02 an untrained model
    is near uniform and greedy decoding repeats one token, which would prove
    nothing about a cache. Here embeddings have unit variance, every projection
    ``1/sqrt(fan_in)``, and the query/key projections an extra factor so attention
    is sharp: the next token depends on which past rows the cache returns.
    Norm gains are one, norm biases zero, other biases small.
    """
    rng = np.random.default_rng(seed)
    c, s = config, config.init_scale
    qk_rows = c.q_dim + c.kv_dim
    weights = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith(".g"):
            weights[name] = np.ones(shape, np.float32)
            continue
        if name.endswith(".b"):  # norm biases (ln_1.b, ln_2.b, ln_f.b)
            weights[name] = np.zeros(shape, np.float32)
            continue
        if name in ("wte", "wpe"):
            std = 1.0
        elif len(shape) == 1:  # a projection's bias
            std = 0.1
        else:  # a matrix, (out, in); the untied head twice as sharp
            std = (2.0 if name == "lm_head" else 1.0) / math.sqrt(shape[1])
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(std * s)
        if name.endswith("attn.w_qkv"):
            w[:qk_rows, :] *= np.float32(2.0)  # sharper attention scores than plain 1/sqrt(d)
        weights[name] = w.astype(np.float32)
    return weights


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies, (head_dim / 2,) float32, computed as Hugging Face's
    ``_compute_default_rope_parameters`` / ``_compute_llama3_parameters`` do (in
    float32, in the same order), so positions rotate by the same angles."""
    f32 = np.float32
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    inv_freq = (f32(1.0) / (f32(config.rope_theta) ** exponent)).astype(f32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = f32(scaling.factor)
    low, high = f32(scaling.low_freq_factor), f32(scaling.high_freq_factor)
    old_len = f32(scaling.original_max_position_embeddings)
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = (f32(2 * math.pi) / inv_freq).astype(f32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(f32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(f32)
    smoothed = ((f32(1) - smooth) * scaled / factor + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


class Model:
    """Decoder over any array API backend: GPT-2 or Llama family (``config.arch``).

    ``Model(config, *, seed=0, xp=None, device=None, weights=None)``: ``xp`` is the
    namespace (``numpy`` when ``None``), ``device`` where the weights live.
    ``weights`` (internal names and shapes: ``weight_shapes(config)``; host or
    backend arrays) replaces the seeded ones: ``engine.load_model`` builds a model
    from a checkpoint that way.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        seed: int = 0,
        xp: Any = None,
        device: Any = None,
        weights: dict[str, Any] | None = None,
    ) -> None:
        self.config = c = config
        self.xp = xp = get_namespace(xp)
        expected = weight_shapes(config)
        if weights is None:
            weights = _init_weights(config, seed)
        else:
            weights = dict(weights)  # popped below; the caller's dict is left alone
            missing = sorted(expected.keys() - weights.keys())
            extra = sorted(weights.keys() - expected.keys())
            if missing or extra:
                raise ValueError(f"weights: missing {missing}, unexpected {extra}")
            for name, shape in expected.items():
                if tuple(weights[name].shape) != shape:
                    raise ValueError(
                        f"weight {name} has shape {tuple(weights[name].shape)}, expected {shape}"
                    )
        self.weights = {}
        for name in list(weights):  # move one at a time; drop each host copy as we go
            self.weights[name] = xp.asarray(weights.pop(name), dtype=xp.float32, device=device)
        self.device = self.weights["wte"].device
        self.float32 = xp.float32
        # set by engine.load_model from the checkpoint's configs
        self.eos_token_ids: tuple[int, ...] = ()
        self.bos_token_id: int | None = None
        self.path: Any = None
        self._scale = 1.0 / math.sqrt(c.head_dim)
        self._neg_inf = xp.asarray(-math.inf, dtype=xp.float32, device=self.device)
        self._gpt2 = c.arch == "gpt2"
        self._rep = c.n_heads // c.n_kv_heads
        self._split = (c.q_dim, c.q_dim + c.kv_dim)
        t = (1, 0)  # matrices are (out, in); the layers hold (in, out) views for x @ W
        self._layers = []
        for i in range(c.n_layers):
            prefix = f"h{i}."
            layer = {
                key[len(prefix) :]: xp.permute_dims(w, t) if w.ndim == 2 else w
                for key, w in self.weights.items()
                if key.startswith(prefix)
            }
            self._layers.append(layer)
        head = self.weights["wte" if c.tie_word_embeddings else "lm_head"]
        self._head = xp.permute_dims(head, t)  # (d, vocab) view
        self._inv_freq = None if self._gpt2 else rope_inverse_frequencies(c)
        self._rope_len = 0
        self._cos = self._sin = None

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the weights as held on the backend (float32)."""
        return sum(math.prod(w.shape) * 4 for w in self.weights.values())

    # -- building blocks ----------------------------------------------------------

    def _norm(self, x: Any, w: dict[str, Any], name: str) -> Any:
        """LayerNorm (gpt2) or RMSNorm (llama), in float32."""
        xp, eps = self.xp, self.config.layer_norm_eps
        if self._gpt2:
            mean = xp.mean(x, axis=-1, keepdims=True)
            centered = x - mean
            variance = xp.mean(centered * centered, axis=-1, keepdims=True)
            return centered / xp.sqrt(variance + eps) * w[name + ".g"] + w[name + ".b"]
        return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps) * w[name + ".g"]

    def _gelu(self, x: Any) -> Any:
        # the tanh approximation of GELU, as GPT-2 uses (erf is not in the standard)
        return 0.5 * x * (1.0 + self.xp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))

    def _silu(self, x: Any) -> Any:
        # x * sigmoid(x), the sigmoid through tanh: no overflow for large |x|
        return 0.5 * x * (1.0 + self.xp.tanh(0.5 * x))

    def _rope_tables(self, end: int) -> tuple[Any, Any]:
        """cos and sin of the rotary angles for positions [0, end), (P, head_dim / 2),
        on the backend; grown (doubling, up to max_seq_len) when a longer context
        comes, never per token."""
        if end > self._rope_len:
            length = min(max(end, 2 * self._rope_len, 256), self.config.max_seq_len)
            positions = np.arange(length, dtype=np.int64).astype(np.float32)
            angles = np.outer(positions, self._inv_freq).astype(np.float32)
            xp = self.xp
            self._cos = xp.asarray(np.cos(angles), device=self.device)
            self._sin = xp.asarray(np.sin(angles), device=self.device)
            self._rope_len = length
        return self._cos, self._sin

    def _rope_at(self, starts: list[int], t: int) -> tuple[Any, Any] | None:
        """cos, sin (T, 1, head_dim / 2) for one sequence at [starts[0], starts[0]+t),
        or for B decode rows at positions ``starts`` (t == 1 each); None for gpt2."""
        if self._gpt2:
            return None
        xp = self.xp
        cos, sin = self._rope_tables(max(starts) + t)
        if len(starts) == 1:
            cos, sin = cos[starts[0] : starts[0] + t, :], sin[starts[0] : starts[0] + t, :]
        else:
            positions = xp.asarray(starts, dtype=xp.int64, device=self.device)
            cos, sin = xp.take(cos, positions, axis=0), xp.take(sin, positions, axis=0)
        shape = (cos.shape[0], 1, cos.shape[1])
        return xp.reshape(cos, shape), xp.reshape(sin, shape)

    def _rotate(self, x: Any, n_heads: int, rope: tuple[Any, Any]) -> Any:
        """Rotary embedding in Hugging Face's half-split convention (``rotate_half``):
        x (T, n_heads * head_dim) -> the same, each head's halves (x1, x2) turned to
        (x1 cos - x2 sin, x2 cos + x1 sin)."""
        xp, half = self.xp, self.config.head_dim // 2
        cos, sin = rope
        t = x.shape[0]
        xh = xp.reshape(x, (t, n_heads, 2 * half))
        x1, x2 = xh[:, :, :half], xh[:, :, half:]
        out = xp.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return xp.reshape(out, (t, n_heads * 2 * half))

    def _causal_softmax(self, scores: Any, start: int) -> Any:
        """scores (..., T, S) of queries at positions [start, start+T) -> probabilities."""
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
        """Causal grouped-query attention of T queries at positions [start, start+T).

        q: (T, n_heads * head_dim) float32; keys, values: (S, n_kv_heads * head_dim)
        in the cache dtype, S = start + T. Query head j reads key/value head
        j // (n_heads / n_kv_heads), as Hugging Face's ``repeat_kv`` arranges; the
        key/value heads are never copied out per query head.
        """
        xp, c, rep = self.xp, self.config, self._rep
        n_kv, hd = c.n_kv_heads, c.head_dim
        t, s = q.shape[0], keys.shape[0]
        if keys.dtype != self.float32:  # a float16 cache: compute in float32
            keys = xp.astype(keys, self.float32)
            values = xp.astype(values, self.float32)
        qh = xp.permute_dims(xp.reshape(q, (t, n_kv, rep, hd)), (1, 2, 0, 3))
        qh = xp.reshape(qh, (n_kv, rep * t, hd))  # (Hkv, rep*T, hd)
        kh = xp.permute_dims(xp.reshape(keys, (s, n_kv, hd)), (1, 2, 0))  # (Hkv, hd, S)
        vh = xp.permute_dims(xp.reshape(values, (s, n_kv, hd)), (1, 0, 2))  # (Hkv, S, hd)
        scores = xp.reshape(xp.matmul(qh, kh), (n_kv, rep, t, s)) * self._scale
        probs = self._causal_softmax(scores, start)  # (Hkv, rep, T, S)
        out = xp.matmul(xp.reshape(probs, (n_kv, rep * t, s)), vh)  # (Hkv, rep*T, hd)
        out = xp.permute_dims(xp.reshape(out, (n_kv, rep, t, hd)), (2, 0, 1, 3))
        return xp.reshape(out, (t, c.q_dim))  # (T, n_heads * hd)

    def _attention_int8(
        self, q: Any, q_keys: Any, key_scales: Any, q_values: Any, value_scales: Any, start: int
    ) -> Any:
        """Attention straight from int8 rows, the scales folded in (no dequantized copy).

        q: (T, n_heads * head_dim) float32; q_keys, q_values: (S, n_kv_heads * head_dim)
        int8; key_scales, value_scales: (S, G) float32, one per group of g = head_dim /
        (G / n_kv_heads) elements (a group never straddles two heads). Per group,
        q . k = scale_k * (q . q_k), and sum_s p_s v_s = sum_s (p_s scale_v) q_v. Query
        heads are grouped on their key/value head as in ``_attention``.
        """
        xp, c, rep = self.xp, self.config, self._rep
        n_kv, hd = c.n_kv_heads, c.head_dim
        t, s = q.shape[0], q_keys.shape[0]
        n_groups = key_scales.shape[1]
        per_head = n_groups // n_kv
        g = hd // per_head
        qg = xp.reshape(q, (t, n_kv, rep, per_head, g))
        qg = xp.reshape(xp.permute_dims(qg, (1, 3, 2, 0, 4)), (n_groups, rep * t, g))
        kg = xp.reshape(xp.astype(q_keys, self.float32), (s, n_groups, g))
        kg = xp.permute_dims(kg, (1, 2, 0))  # (G, g, S)
        k_scale = xp.reshape(xp.permute_dims(key_scales, (1, 0)), (n_groups, 1, s))
        partial = xp.matmul(qg, kg) * k_scale  # (G, rep*T, S): each group's share of q . k
        scores = xp.sum(xp.reshape(partial, (n_kv, per_head, rep * t, s)), axis=1)
        probs = self._causal_softmax(xp.reshape(scores, (n_kv, rep, t, s)) * self._scale, start)
        v_scale = xp.reshape(xp.permute_dims(value_scales, (1, 0)), (n_kv, per_head, 1, s))
        pg = xp.reshape(xp.reshape(probs, (n_kv, 1, rep * t, s)) * v_scale, (n_groups, rep * t, s))
        vg = xp.reshape(xp.astype(q_values, self.float32), (s, n_groups, g))
        out = xp.matmul(pg, xp.permute_dims(vg, (1, 0, 2)))  # (G, rep*T, g)
        out = xp.permute_dims(xp.reshape(out, (n_kv, per_head, rep, t, g)), (3, 0, 2, 1, 4))
        return xp.reshape(out, (t, c.q_dim))  # (T, n_heads * head_dim)

    def _read_cache(self, cache: Cache, layer_idx: int, q: Any, k: Any, v: Any, start: int) -> Any:
        """Append k, v to one sequence's cache and attend q over what it holds.

        An int8 cache whose scale groups fit in a head is read through
        ``append_quantized`` by the scale-folding attention; any other cache through
        ``append`` and the views (or copies) it returns.
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
          at position ``starts[i]``; each cache gets one ``(width,)`` append per
          layer. Projections and MLP run batched over the rows (``batch_invariant``:
          as stacked one-row products, see ``_matmul_rows``), attention per sequence.
        - else (prefill): x is one sequence at positions [starts[0], starts[0] + T),
          appended to ``caches[0]`` as one ``(T, width)`` call per layer.

        Keys are stored in the cache after the rotary embedding (llama), as every
        production engine stores them.
        """
        xp, c = self.xp, self.config
        q_end, k_end = self._split
        gpt2, f = self._gpt2, c.hidden_dim
        matmul = self._matmul_rows if decode and batch_invariant else xp.matmul
        rope = self._rope_at(starts, 1 if decode else x.shape[0])
        for layer_idx, w in enumerate(self._layers):
            h = self._norm(x, w, "ln_1")
            qkv = matmul(h, w["attn.w_qkv"])  # (T, qd + 2 kvd)
            if "attn.b_qkv" in w:
                qkv = qkv + w["attn.b_qkv"]
            q, k, v = qkv[:, :q_end], qkv[:, q_end:k_end], qkv[:, k_end:]
            if rope is not None:
                q, k = self._rotate(q, c.n_heads, rope), self._rotate(k, c.n_kv_heads, rope)
            if caches is None:
                attn = self._attention(q, k, v, starts[0])
            elif not decode:
                attn = self._read_cache(caches[0], layer_idx, q, k, v, starts[0])
            elif len(caches) == 1:  # one decode row: the contract's (width,) append
                attn = self._read_cache(caches[0], layer_idx, q, k[0, :], v[0, :], starts[0])
            else:
                attn = xp.concat(
                    [
                        self._read_cache(cache, layer_idx, q[i : i + 1, :], k[i, :], v[i, :], start)
                        for i, (cache, start) in enumerate(zip(caches, starts, strict=True))
                    ],
                    axis=0,
                )  # (B, qd)
            x = x + matmul(attn, w["attn.w_out"])
            if "attn.b_out" in w:
                x = x + w["attn.b_out"]
            h = self._norm(x, w, "ln_2")
            if gpt2:
                h = self._gelu(matmul(h, w["mlp.w_in"]) + w["mlp.b_in"])  # (T, 4d)
                x = x + matmul(h, w["mlp.w_out"]) + w["mlp.b_out"]
            else:
                gate_up = matmul(h, w["mlp.w_gate_up"])  # (T, 2f)
                h = self._silu(gate_up[:, :f]) * gate_up[:, f:]
                x = x + matmul(h, w["mlp.w_out"])
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
        x = self._norm(x, self.weights, "ln_f")
        return (self._matmul_rows if rowwise else self.xp.matmul)(x, self._head)

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
        x = self.weights["wte"][token : token + 1, :]
        if self._gpt2:
            x = x + self.weights["wpe"][start : start + 1, :]
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
        x = xp.take(self.weights["wte"], ids, axis=0)
        if self._gpt2:
            positions = xp.asarray(starts, dtype=xp.int64, device=self.device)
            x = x + xp.take(self.weights["wpe"], positions, axis=0)
        x = self._blocks(x, starts, caches, decode=True, batch_invariant=batch_invariant)
        return self._logits(x, rowwise=batch_invariant)  # (B, vocab)

    def _embed(self, tokens: list[int], start: int) -> Any:
        xp = self.xp
        ids = xp.asarray(tokens, dtype=xp.int64, device=self.device)
        x = xp.take(self.weights["wte"], ids, axis=0)  # (T, d)
        if self._gpt2:
            x = x + self.weights["wpe"][start : start + len(tokens), :]
        return x

    def make_cache(self, max_seq_len: int, dtype: Any = "float32") -> KVCache | Int8KVCache:
        """A cache shaped for this model, on its backend and device.

        ``dtype`` is a floating dtype (a ``KVCache`` storing it) or ``"int8"`` (an
        ``Int8KVCache`` with one scale per token per head).
        """
        c = self.config
        if isinstance(dtype, str) and dtype == "int8":
            return Int8KVCache(
                c.n_layers, c.kv_dim, max_seq_len, xp=self.xp, device=self.device,
                group_size=c.head_dim,
            )  # fmt: skip
        return KVCache(c.n_layers, c.kv_dim, max_seq_len, dtype, xp=self.xp, device=self.device)

    def generate_stream(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        cache: Cache | None = None,
        cache_dtype: Any = "float32",
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Iterable[int] | None = None,
    ) -> Iterator[int]:
        """Decoding: an iterator over the new tokens, each as it is chosen.

        Greedy by default; ``temperature > 0`` samples, filtered by ``top_k`` and
        ``top_p``, from a Generator seeded with ``seed`` (see ``engine.sampling``).
        Generation stops after an EOS token (which is yielded): ``eos_token_id``
        gives the ids, ``None`` means the model's own (``eos_token_ids``, from a
        checkpoint's configs; none for a seeded model), ``()`` never stops early.

        Bad arguments raise here, before the iterator is returned.
        Without ``cache``, builds ``KVCache(n_layers, kv_dim, len(prompt) +
        max_new_tokens, cache_dtype)`` (``cache_dtype="int8"``: an ``Int8KVCache``,
        see ``make_cache``). A cache passed in is used as it is: the prompt
        continues whatever it already holds.
        """
        prompt = self._check_tokens(prompt, "prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, seed), self.xp)
        eos = self.stop_tokens(eos_token_id)
        start = 0 if cache is None else cache.get_seq_length(0)
        # the last new token is returned, never fed back: it needs no position
        self._check_room(start, len(prompt) + max(max_new_tokens - 1, 0))
        if cache is None:
            cache = self.make_cache(len(prompt) + max_new_tokens, cache_dtype)
        return self._decode(prompt, max_new_tokens, cache, sampler, eos)

    def stop_tokens(self, eos_token_id: int | Iterable[int] | None = None) -> frozenset[int]:
        """The ids that end a generation: ``eos_token_id`` (an int or ints) checked,
        or the model's ``eos_token_ids`` for ``None``; ``()`` for none."""
        if eos_token_id is None:
            return frozenset(self.eos_token_ids)
        ids = eos_token_id if isinstance(eos_token_id, Iterable) else [eos_token_id]
        if isinstance(ids, str | bytes) or any(isinstance(i, bool) for i in ids):
            raise TypeError(f"eos_token_id must be an int or ints, got {eos_token_id!r}")
        try:
            return frozenset(operator.index(i) for i in ids)
        except TypeError:
            raise TypeError(f"eos_token_id must be an int or ints, got {eos_token_id!r}") from None

    def _decode(
        self, prompt: list[int], max_new_tokens: int, cache: Cache, pick: Sampler, eos: frozenset
    ) -> Iterator[int]:
        if max_new_tokens == 0:
            return
        token = pick(self.prefill(prompt, cache))
        yield token
        for _ in range(max_new_tokens - 1):
            if token in eos:
                return
            token = pick(self.decode_step(token, cache))
            yield token

    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        cache: Cache | None = None,
        cache_dtype: Any = "float32",
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Iterable[int] | None = None,
    ) -> list[int]:
        """Decoding (greedy by default); returns the new tokens only: ``max_new_tokens``
        of them, or fewer when an EOS token ends it (see ``generate_stream``)."""
        return list(
            self.generate_stream(
                prompt, max_new_tokens, cache=cache, cache_dtype=cache_dtype,
                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                eos_token_id=eos_token_id,
            )
        )  # fmt: skip
