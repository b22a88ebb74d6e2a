"""Tiny random checkpoints in the exact Hugging Face layout, and an independent
float64 NumPy forward pass over them by their Hugging Face names.

The writer follows the safetensors format from its specification (8-byte
little-endian header length, JSON header padded with spaces, raw little-endian
data) and shares no code with ``engine.checkpoint``'s reader. The reference
forward (``reference_logits``) is written from the Hugging Face modelling code's
structure (separate q/k/v, ``repeat_kv``, ``rotate_half``, Conv1D as x @ W) and
shares no code with ``engine.model``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

GPT2 = {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "vocab_size": 96,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "n_inner": None,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "tie_word_embeddings": True,
    "bos_token_id": 95,
    "eos_token_id": 95,
}
# grouped-query attention: 8 query heads on 2 key/value heads, explicit head_dim 8
# (queries 64 wide on a 32-wide residual; cache rows 16 wide)
LLAMA_GQA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Llama 3.x: llama3 rope scaling (original context 16, so the test's positions are
# well past it), rope_theta 500000, tied head, the Transformers 5 key rope_parameters
LLAMA3 = LLAMA_GQA | {
    "num_attention_heads": 4,
    "head_dim": None,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}
del LLAMA3["rope_theta"], LLAMA3["rope_scaling"]
QWEN2 = LLAMA_GQA | {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "num_attention_heads": 4,
    "head_dim": None,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "tie_word_embeddings": True,
}
# the same scaling as Transformers 4.x wrote it: top-level rope_theta, rope_scaling
LLAMA3_V4_KEYS = LLAMA_GQA | {
    "rope_theta": 500000.0,
    "rope_scaling": {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}
CONFIGS = {
    "gpt2": GPT2,
    "llama-gqa": LLAMA_GQA,
    "llama3": LLAMA3,
    "llama3-v4-keys": LLAMA3_V4_KEYS,
    "qwen2": QWEN2,
}


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def gpt2_tensors(cfg: dict, seed: int = 0, *, prefix: str = "transformer.") -> dict:
    """GPT-2 weights by their Hugging Face names; Conv1D weights (in, out)."""
    rng = np.random.default_rng(seed)
    d, v, n = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    f = cfg["n_inner"] or 4 * d
    t = {"wte.weight": _normal(rng, (v, d), 0.3), "wpe.weight": _normal(rng, (n, d), 0.3)}
    t |= {"ln_f.weight": 1 + _normal(rng, (d,), 0.1), "ln_f.bias": _normal(rng, (d,), 0.1)}
    for i in range(cfg["n_layer"]):
        h = f"h.{i}."
        t |= {
            h + "ln_1.weight": 1 + _normal(rng, (d,), 0.1),
            h + "ln_1.bias": _normal(rng, (d,), 0.1),
            h + "attn.c_attn.weight": _normal(rng, (d, 3 * d), 2 / math.sqrt(d)),
            h + "attn.c_attn.bias": _normal(rng, (3 * d,), 0.1),
            h + "attn.c_proj.weight": _normal(rng, (d, d), 2 / math.sqrt(d)),
            h + "attn.c_proj.bias": _normal(rng, (d,), 0.1),
            h + "ln_2.weight": 1 + _normal(rng, (d,), 0.1),
            h + "ln_2.bias": _normal(rng, (d,), 0.1),
            h + "mlp.c_fc.weight": _normal(rng, (d, f), 1 / math.sqrt(d)),
            h + "mlp.c_fc.bias": _normal(rng, (f,), 0.1),
            h + "mlp.c_proj.weight": _normal(rng, (f, d), 2 / math.sqrt(f)),
            h + "mlp.c_proj.bias": _normal(rng, (d,), 0.1),
        }
    t = {prefix + k: w for k, w in t.items()}
    if not cfg.get("tie_word_embeddings", True):
        t["lm_head.weight"] = _normal(rng, (v, d), 1 / math.sqrt(d))
    return t


def llama_tensors(cfg: dict, seed: int = 0) -> dict:
    """Llama / Mistral / Qwen2 weights by their Hugging Face names; (out, in)."""
    rng = np.random.default_rng(seed)
    d, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads
    bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    t = {"model.embed_tokens.weight": _normal(rng, (v, d), 0.3)}
    t["model.norm.weight"] = 1 + _normal(rng, (d,), 0.1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        t |= {
            p + "input_layernorm.weight": 1 + _normal(rng, (d,), 0.1),
            a + "q_proj.weight": _normal(rng, (heads * hd, d), 2 / math.sqrt(d)),
            a + "k_proj.weight": _normal(rng, (kv * hd, d), 2 / math.sqrt(d)),
            a + "v_proj.weight": _normal(rng, (kv * hd, d), 1 / math.sqrt(d)),
            a + "o_proj.weight": _normal(rng, (d, heads * hd), 2 / math.sqrt(heads * hd)),
            p + "post_attention_layernorm.weight": 1 + _normal(rng, (d,), 0.1),
            m + "gate_proj.weight": _normal(rng, (f, d), 1 / math.sqrt(d)),
            m + "up_proj.weight": _normal(rng, (f, d), 1 / math.sqrt(d)),
            m + "down_proj.weight": _normal(rng, (d, f), 2 / math.sqrt(f)),
        }
        if bias:
            t |= {
                a + "q_proj.bias": _normal(rng, (heads * hd,), 0.1),
                a + "k_proj.bias": _normal(rng, (kv * hd,), 0.1),
                a + "v_proj.bias": _normal(rng, (kv * hd,), 0.1),
            }
        if cfg.get("attention_bias", False):
            t[a + "o_proj.bias"] = _normal(rng, (d,), 0.1)
    if not cfg.get("tie_word_embeddings", False):
        t["lm_head.weight"] = _normal(rng, (v, d), 2 / math.sqrt(d))
    return t


def tensors_for(cfg: dict, seed: int = 0) -> dict:
    return gpt2_tensors(cfg, seed) if cfg["model_type"] == "gpt2" else llama_tensors(cfg, seed)


# (Scales: small embeddings and strong output projections, so that a tied head does
# not just echo the input token and greedy sequences vary.)

# -- safetensors, from the specification ---------------------------------------------


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 values a tensor has once stored as ``dtype`` (F32, F16, BF16)."""
    if dtype == "F16":
        return a.astype(np.float16).astype(np.float64)
    if dtype == "BF16":
        return (to_bf16_bits(a).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def safetensors_bytes(tensors: dict, dtype: str = "F32", metadata: dict | None = None) -> bytes:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    chunks, offset = [], 0
    for name, a in tensors.items():
        if dtype == "BF16":
            raw = to_bf16_bits(a).astype("<u2").tobytes()
        else:
            raw = np.asarray(a).astype("<f2" if dtype == "F16" else "<f4").tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(np.shape(a)),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def write_folder(
    folder: Path,
    cfg: dict,
    tensors: dict,
    *,
    dtype: str = "F32",
    shards: int = 1,
    generation_config: dict | None = None,
) -> Path:
    """A Hugging Face model folder: config.json, model.safetensors (or ``shards``
    files with model.safetensors.index.json), optionally generation_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    if shards == 1:
        (folder / "model.safetensors").write_bytes(safetensors_bytes(tensors, dtype))
        return folder
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        (folder / file).write_bytes(safetensors_bytes(part, dtype))
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


# -- the independent reference forward ----------------------------------------------


def _layer_norm(x, g, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * g + b


def _rms_norm(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def _softmax_causal(scores):  # (H, T, T)
    t = scores.shape[-1]
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(-1, keepdims=True)


def _inv_freq(cfg: dict, hd: int) -> np.ndarray:
    rope = cfg.get("rope_parameters") or (cfg.get("rope_scaling") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    if rope.get("rope_type", rope.get("type")) == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        out = []
        for w, freq in zip(wavelen, inv, strict=True):
            if w < old / hi:
                out.append(freq)
            elif w > old / lo:
                out.append(freq / factor)
            else:
                smooth = (old / w - lo) / (hi - lo)
                out.append((1 - smooth) * freq / factor + smooth * freq)
        inv = np.array(out)
    return inv


def reference_logits(cfg: dict, tensors: dict, tokens: list[int], dtype: str = "F32"):
    """Logits (T, vocab), float64, of the Hugging Face model ``cfg`` with ``tensors``
    (stored as ``dtype``) on ``tokens``."""
    w = {k.removeprefix("transformer."): rounded(a, dtype) for k, a in tensors.items()}
    t = len(tokens)
    if cfg["model_type"] == "gpt2":
        d, nh, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
        hd = d // nh
        x = w["wte.weight"][tokens] + w["wpe.weight"][:t]
        for i in range(cfg["n_layer"]):
            p = f"h.{i}."
            h = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
            qkv = h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
            q, k, v = (
                qkv[:, j * d : (j + 1) * d].reshape(t, nh, hd).transpose(1, 0, 2) for j in range(3)
            )
            probs = _softmax_causal(q @ k.transpose(0, 2, 1) / math.sqrt(hd))
            a = (probs @ v).transpose(1, 0, 2).reshape(t, d)
            x = x + a @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
            h = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
            h = h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]
            h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
            x = x + h @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
        x = _layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], eps)
        head = w.get("lm_head.weight", w["wte.weight"])
        return x @ head.T
    d, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    kvh, eps = cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    hd = cfg.get("head_dim") or d // nh
    angles = np.arange(t)[:, None] * _inv_freq(cfg, hd)[None, :]
    cos = np.cos(np.concatenate([angles, angles], -1))[None]  # (1, T, hd)
    sin = np.sin(np.concatenate([angles, angles], -1))[None]

    def rotate_half(z):
        return np.concatenate([-z[..., hd // 2 :], z[..., : hd // 2]], -1)

    x = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        proj = {}
        for name, heads in (("q", nh), ("k", kvh), ("v", kvh)):
            y = h @ w[a + f"{name}_proj.weight"].T + w.get(a + f"{name}_proj.bias", 0.0)
            proj[name] = y.reshape(t, heads, hd).transpose(1, 0, 2)  # (heads, T, hd)
        q = proj["q"] * cos + rotate_half(proj["q"]) * sin
        k = proj["k"] * cos + rotate_half(proj["k"]) * sin
        k, v = np.repeat(k, nh // kvh, axis=0), np.repeat(proj["v"], nh // kvh, axis=0)
        probs = _softmax_causal(q @ k.transpose(0, 2, 1) / math.sqrt(hd))
        out = (probs @ v).transpose(1, 0, 2).reshape(t, nh * hd)
        x = x + out @ w[a + "o_proj.weight"].T + w.get(a + "o_proj.bias", 0.0)
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = _rms_norm(x, w["model.norm.weight"], eps)
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T
