"""Load GPT-2 and Llama-family models from a local Hugging Face folder.

``load_model(path, *, xp=None, device=None)`` reads ``config.json`` (and
``generation_config.json`` for the EOS ids), then the weights from
``model.safetensors`` or from the shards that ``model.safetensors.index.json`` maps,
and returns an ``engine.Model`` on the chosen backend.

- Safetensors only, read by this module's own parser (8-byte length, JSON header,
  raw little-endian data): no pickle, no code from the folder is ever run.
  float32, float16 and bfloat16 load (bfloat16 by widening its bits to float32, as
  NumPy has no bfloat16); the model computes in float32.
- Every header is read and checked against the config before any tensor data:
  missing or unexpected tensors, shapes that disagree with the config, data that
  runs past the end of the file (truncated) and malformed headers raise
  ``CheckpointError`` naming the file, the tensor and what was expected. Nothing
  half-built is returned.
- Tensors are then read one at a time, converted to the model's layout and moved to
  the backend, so the host holds one tensor (one layer's fused q|k|v) beyond the
  weights themselves, never a second copy of the model.

Supported ``model_type``: ``gpt2``; ``llama`` (RoPE in the half-split convention,
``rope_scaling`` none/``default``/``llama3``, GQA, explicit ``head_dim``,
``attention_bias``, tied or untied head); ``mistral`` (the same; a
``sliding_window`` caps the context at the window, as nothing beyond it is
implemented); ``qwen2`` (the same with q/k/v biases; ``use_sliding_window`` is
refused).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvcache_xp import get_namespace

from .model import Model, ModelConfig, RopeScaling

__all__ = ["CheckpointError", "SafetensorsFile", "load_config", "load_model"]

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

# safetensors dtype -> (little-endian NumPy dtype it is read as, bytes per element)
_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8)}


class CheckpointError(ValueError):
    """A model folder that cannot be loaded: the message names the file and the problem."""


# -- safetensors ------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    file: Path
    name: str
    dtype: str  # safetensors' name: F32, F16, BF16, F64
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


class SafetensorsFile:
    """The checked header of one ``.safetensors`` file; ``read(name)`` returns a tensor
    as a float32 NumPy array.

    The header is validated whole on opening: JSON of the right shape, known dtypes,
    byte ranges that match the shapes, tile the data region without gaps or
    overlaps, and end exactly where the file ends (a shorter file is truncated).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(
                        f"{path}: {size} bytes, too short for a safetensors file "
                        "(8-byte header length missing): truncated or not safetensors"
                    )
                header_len = int.from_bytes(prefix, "little")
                if header_len > min(size - 8, _MAX_HEADER):
                    raise CheckpointError(
                        f"{path}: header length {header_len} runs past the file's {size} bytes: "
                        "truncated or not safetensors"
                    )
                raw = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e}") from e
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        data_size = size - data_start
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, entry in header.items():
            info = self._entry(name, entry, data_start)
            spans.append((info.offset - data_start, info.offset - data_start + info.nbytes, name))
            self.tensors[name] = info
        spans.sort()
        end = 0
        for begin, stop, name in spans:
            if begin != end:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header: tensor {name} starts at byte {begin} "
                    f"of the data, expected {end} (gap or overlap)"
                )
            end = stop
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: the header describes {end} bytes of tensor data, the file "
                f"holds {data_size}"
            )
        if end < data_size:
            raise CheckpointError(
                f"{path}: corrupt: {data_size - end} bytes after the last tensor's data"
            )

    def _entry(self, name: str, entry: Any, data_start: int) -> TensorInfo:
        where = f"{self.path}: tensor {name}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: corrupt header entry {entry!r}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPES:
            raise CheckpointError(
                f"{where}: dtype {dtype!r} is not supported (supported: {', '.join(_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise CheckpointError(f"{where}: corrupt shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where}: corrupt data_offsets {offsets!r}")
        nbytes = math.prod(shape) * _DTYPES[dtype][1]
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes; "
                f"{dtype} {shape} needs {nbytes}"
            )
        return TensorInfo(self.path, name, dtype, tuple(shape), data_start + offsets[0], nbytes)

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a float32 NumPy array (bfloat16 widened exactly)."""
        return read_tensor(self.tensors[name])


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor from its file into a new float32 host array."""
    np_dtype, _ = _DTYPES[info.dtype]
    out = np.empty(info.shape, dtype=np_dtype)
    try:
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(memoryview(out).cast("B")) if info.nbytes else 0
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read tensor {info.name}: {e}") from e
    if got != info.nbytes:
        raise CheckpointError(
            f"{info.file}: truncated: tensor {info.name} has {got} of its {info.nbytes} bytes"
        )
    if info.dtype == "BF16":  # bfloat16 is the top half of a float32
        return (out.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return out.astype(np.float32, copy=False)


# -- the folder -------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name} ({what})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _tensor_index(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the folder's safetensors weights, headers checked."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return dict(SafetensorsFile(single).tensors)
    if not index.is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt*")
        )
        hint = (
            f"; found {', '.join(pickles)}: pickle files are never loaded (they can run "
            "code). Convert them to safetensors first"
            if pickles
            else ""
        )
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} and no {INDEX_NAME}{hint}")
    weight_map = _read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    shards: dict[str, SafetensorsFile] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index}: tensor {name} maps to {shard!r}, not a file name")
        if shard not in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"{index}: shard {shard} (of tensor {name}) is missing")
            shards[shard] = SafetensorsFile(folder / shard)
        if name not in shards[shard].tensors:
            raise CheckpointError(f"{index}: tensor {name} is not in its shard {shard}")
        tensors[name] = shards[shard].tensors[name]
    for shard, file in shards.items():
        unlisted = sorted(file.tensors.keys() - weight_map.keys())
        if unlisted:
            raise CheckpointError(
                f"{folder / shard}: unexpected tensor {unlisted[0]} (not in {INDEX_NAME})"
            )
    return tensors


def _get(config: dict[str, Any], key: str, kind: type, default: Any = ..., path: str = "") -> Any:
    value = config.get(key, default)
    if value is ...:
        raise CheckpointError(f"{path}: {key} is missing")
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is bool:
        ok = isinstance(value, bool)
    if not ok:
        expected = getattr(kind, "__name__", None) or str(kind).replace("NoneType", "null")
        raise CheckpointError(f"{path}: {key} must be {expected}, got {value!r}")
    return float(value) if kind is float else value


def _rope(config: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and rope_scaling, from Transformers 5's ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling``."""
    params = config.get("rope_parameters")
    if params is None:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: rope_parameters/rope_scaling must be an object")
    theta = _get(params, "rope_theta", float, 10000.0, where)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(
            f"{where}: rope_scaling type {kind!r} is not supported (supported: default, llama3)"
        )
    scaling = RopeScaling(
        factor=_get(params, "factor", float, path=where),
        low_freq_factor=_get(params, "low_freq_factor", float, path=where),
        high_freq_factor=_get(params, "high_freq_factor", float, path=where),
        original_max_position_embeddings=_get(
            params, "original_max_position_embeddings", int, path=where
        ),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor or scaling.factor <= 0:
        raise CheckpointError(
            f"{where}: llama3 rope_scaling needs high_freq_factor > low_freq_factor"
        )
    return theta, scaling


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face folder's ``config.json``; raises
    ``CheckpointError`` for a missing config or an unsupported architecture."""
    return _model_config(Path(path), _read_config(Path(path)))


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    return _read_json(folder / CONFIG_NAME, "the model's config")


def _model_config(folder: Path, cfg: dict[str, Any]) -> ModelConfig:
    where = str(folder / CONFIG_NAME)
    model_type = cfg.get("model_type")
    name = folder.name or str(folder)
    if model_type == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{where}: activation_function {act!r} is not supported")
        if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx"):
            raise CheckpointError(
                f"{where}: only GPT-2's standard 1/sqrt(head_dim) attention scale"
            )
        d = _get(cfg, "n_embd", int, path=where)
        return _config(
            where,
            name=name,
            arch="gpt2",
            vocab_size=_get(cfg, "vocab_size", int, path=where),
            d_model=d,
            n_layers=_get(cfg, "n_layer", int, path=where),
            n_heads=_get(cfg, "n_head", int, path=where),
            max_seq_len=_get(cfg, "n_positions", int, path=where),
            d_ff=_get(cfg, "n_inner", int | type(None), None, where) or 4 * d,
            layer_norm_eps=_get(cfg, "layer_norm_epsilon", float, 1e-5, where),
            tie_word_embeddings=_get(cfg, "tie_word_embeddings", bool, True, where),
        )
    if model_type in ("llama", "mistral", "qwen2"):
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (only silu)")
        if cfg.get("mlp_bias"):
            raise CheckpointError(f"{where}: mlp_bias is not supported")
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise CheckpointError(f"{where}: use_sliding_window is not supported")
        theta, scaling = _rope(cfg, where)
        heads = _get(cfg, "num_attention_heads", int, path=where)
        max_len = _get(cfg, "max_position_embeddings", int, path=where)
        window = cfg.get("sliding_window") if model_type == "mistral" else None
        if window is not None:
            max_len = min(max_len, _get(cfg, "sliding_window", int, path=where))
        attention_bias = _get(cfg, "attention_bias", bool, False, where)
        return _config(
            where,
            name=name,
            arch="llama",
            vocab_size=_get(cfg, "vocab_size", int, path=where),
            d_model=_get(cfg, "hidden_size", int, path=where),
            n_layers=_get(cfg, "num_hidden_layers", int, path=where),
            n_heads=heads,
            n_kv_heads=_get(cfg, "num_key_value_heads", int | type(None), None, where) or heads,
            head_dim=_get(cfg, "head_dim", int | type(None), None, where) or 0,
            max_seq_len=max_len,
            d_ff=_get(cfg, "intermediate_size", int, path=where),
            layer_norm_eps=_get(cfg, "rms_norm_eps", float, 1e-6, where),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=model_type == "qwen2" or attention_bias,
            out_bias=attention_bias,
            tie_word_embeddings=_get(cfg, "tie_word_embeddings", bool, False, where),
        )
    raise CheckpointError(
        f"{where}: model_type {model_type!r} is not supported (supported: gpt2, llama, "
        "mistral, qwen2)"
    )


def _config(where: str, **fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


# -- Hugging Face names -> the model's weights --------------------------------------

# Each internal weight is built from one or more checkpoint tensors:
# (internal name, [checkpoint names], transform), transform one of
#   "copy"  the tensor as it is (already (out, in), or a vector)
#   "T"     a GPT-2 Conv1D weight, stored (in, out): transposed
#   "cat"   several (out_i, in) tensors stacked along out (q|k|v, gate|up)
_Plan = list[tuple[str, list[str], str]]


def _gpt2_plan(c: ModelConfig) -> tuple[_Plan, dict[str, tuple[int, ...]]]:
    d, f = c.d_model, c.hidden_dim
    plan: _Plan = [("wte", ["wte.weight"], "copy"), ("wpe", ["wpe.weight"], "copy")]
    plan += [("ln_f.g", ["ln_f.weight"], "copy"), ("ln_f.b", ["ln_f.bias"], "copy")]
    shapes = {"wte.weight": (c.vocab_size, d), "wpe.weight": (c.max_seq_len, d)}
    shapes |= {"ln_f.weight": (d,), "ln_f.bias": (d,)}
    if not c.tie_word_embeddings:
        plan.append(("lm_head", ["lm_head.weight"], "copy"))
        shapes["lm_head.weight"] = (c.vocab_size, d)
    for i in range(c.n_layers):
        h = f"h.{i}."
        layer = [
            ("ln_1.g", "ln_1.weight", (d,), "copy"),
            ("ln_1.b", "ln_1.bias", (d,), "copy"),
            ("attn.w_qkv", "attn.c_attn.weight", (d, 3 * d), "T"),
            ("attn.b_qkv", "attn.c_attn.bias", (3 * d,), "copy"),
            ("attn.w_out", "attn.c_proj.weight", (d, d), "T"),
            ("attn.b_out", "attn.c_proj.bias", (d,), "copy"),
            ("ln_2.g", "ln_2.weight", (d,), "copy"),
            ("ln_2.b", "ln_2.bias", (d,), "copy"),
            ("mlp.w_in", "mlp.c_fc.weight", (d, f), "T"),
            ("mlp.b_in", "mlp.c_fc.bias", (f,), "copy"),
            ("mlp.w_out", "mlp.c_proj.weight", (f, d), "T"),
            ("mlp.b_out", "mlp.c_proj.bias", (d,), "copy"),
        ]
        for internal, hf, shape, how in layer:
            plan.append((f"h{i}.{internal}", [h + hf], how))
            shapes[h + hf] = shape
    return plan, shapes


def _llama_plan(c: ModelConfig) -> tuple[_Plan, dict[str, tuple[int, ...]]]:
    d, f, qd, kvd = c.d_model, c.hidden_dim, c.q_dim, c.kv_dim
    plan: _Plan = [
        ("wte", ["model.embed_tokens.weight"], "copy"),
        ("ln_f.g", ["model.norm.weight"], "copy"),
    ]
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
    if not c.tie_word_embeddings:
        plan.append(("lm_head", ["lm_head.weight"], "copy"))
        shapes["lm_head.weight"] = (c.vocab_size, d)
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        qkv = [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]
        plan += [
            (f"h{i}.ln_1.g", [p + "input_layernorm.weight"], "copy"),
            (f"h{i}.attn.w_qkv", qkv, "cat"),
            (f"h{i}.attn.w_out", [a + "o_proj.weight"], "copy"),
            (f"h{i}.ln_2.g", [p + "post_attention_layernorm.weight"], "copy"),
            (f"h{i}.mlp.w_gate_up", [m + "gate_proj.weight", m + "up_proj.weight"], "cat"),
            (f"h{i}.mlp.w_out", [m + "down_proj.weight"], "copy"),
        ]
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            qkv[0]: (qd, d),
            qkv[1]: (kvd, d),
            qkv[2]: (kvd, d),
            a + "o_proj.weight": (d, qd),
            m + "gate_proj.weight": (f, d),
            m + "up_proj.weight": (f, d),
            m + "down_proj.weight": (d, f),
        }
        if c.qkv_bias:
            biases = [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]
            plan.append((f"h{i}.attn.b_qkv", biases, "cat"))
            shapes |= {biases[0]: (qd,), biases[1]: (kvd,), biases[2]: (kvd,)}
        if c.out_bias:
            plan.append((f"h{i}.attn.b_out", [a + "o_proj.bias"], "copy"))
            shapes[a + "o_proj.bias"] = (d,)
    return plan, shapes


# tensors some checkpoints carry that the model recomputes or does not need
_IGNORED = {
    "gpt2": re.compile(r"h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight"),
    "llama": re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|lm_head\.weight"),
}


def _strip_gpt2_prefix(tensors: dict[str, TensorInfo], folder: Path) -> dict[str, TensorInfo]:
    """GPT-2 hub files name tensors ``h.0...``; ``save_pretrained`` writes
    ``transformer.h.0...``. Accept either, not a mixture."""
    prefixed = [n for n in tensors if n.startswith("transformer.")]
    if not prefixed:
        return tensors
    plain = [n for n in tensors if not n.startswith("transformer.") and n != "lm_head.weight"]
    if plain:
        raise CheckpointError(
            f"{folder}: unexpected tensor {plain[0]} beside 'transformer.'-prefixed names"
        )
    return {n.removeprefix("transformer."): info for n, info in tensors.items()}


def _check_tensors(
    tensors: dict[str, TensorInfo], shapes: dict[str, tuple[int, ...]], arch: str, folder: Path
) -> None:
    missing = sorted(shapes.keys() - tensors.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{folder}: missing tensor {missing[0]}{more}, which {CONFIG_NAME} implies"
        )
    ignored = _IGNORED[arch]
    unexpected = sorted(n for n in tensors.keys() - shapes.keys() if not ignored.fullmatch(n))
    if unexpected:
        raise CheckpointError(
            f"{tensors[unexpected[0]].file}: unexpected tensor {unexpected[0]} "
            f"(not part of the {arch} model {CONFIG_NAME} describes)"
        )
    for name, shape in shapes.items():
        info = tensors[name]
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {name} has shape {list(info.shape)}; {CONFIG_NAME} "
                f"implies {list(shape)}"
            )


def _build(plan: _Plan, tensors: dict[str, TensorInfo]) -> Iterator[tuple[str, np.ndarray]]:
    """Each internal weight as a float32 host array, one at a time."""
    for internal, names, how in plan:
        if how == "copy":
            yield internal, read_tensor(tensors[names[0]])
        elif how == "T":
            yield internal, np.ascontiguousarray(read_tensor(tensors[names[0]]).T)
        else:  # "cat": stack along the first axis, into one buffer
            infos = [tensors[n] for n in names]
            out = np.empty((sum(i.shape[0] for i in infos), *infos[0].shape[1:]), np.float32)
            row = 0
            for info in infos:
                out[row : row + info.shape[0]] = read_tensor(info)
                row += info.shape[0]
            yield internal, out


def _eos_ids(
    folder: Path, cfg: dict[str, Any], vocab_size: int
) -> tuple[tuple[int, ...], int | None]:
    """EOS ids (generation_config.json first, as Transformers does) and the BOS id."""
    sources = [cfg]
    gen = folder / GENERATION_CONFIG_NAME
    if gen.is_file():
        sources.insert(0, _read_json(gen, "generation config"))
    eos: Any = None
    bos: Any = None
    for source in sources:
        if eos is None:
            eos = source.get("eos_token_id")
        if bos is None:
            bos = source.get("bos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise CheckpointError(f"{folder}: eos_token_id must be int(s), got {eos!r}")
    # out-of-vocabulary ids cannot be produced: keep only real ones
    eos_ids = tuple(i for i in ids if 0 <= i < vocab_size)
    return eos_ids, bos if isinstance(bos, int) and not isinstance(bos, bool) else None


def load_model(path: str | os.PathLike, *, xp: Any = None, device: Any = None) -> Model:
    """A ``Model`` built from the Hugging Face folder ``path`` on namespace ``xp``
    (NumPy when ``None``) and ``device``.

    The model also carries ``eos_token_ids`` (from ``generation_config.json``, else
    ``config.json``), ``bos_token_id`` and ``path``. Raises ``CheckpointError`` for
    anything wrong with the folder, before reading any weights where it can.
    """
    folder = Path(path)
    cfg = _read_config(folder)
    config = _model_config(folder, cfg)
    xp = get_namespace(xp)
    tensors = _tensor_index(folder)
    if config.arch == "gpt2":
        tensors = _strip_gpt2_prefix(tensors, folder)
        plan, shapes = _gpt2_plan(config)
    else:
        plan, shapes = _llama_plan(config)
    _check_tensors(tensors, shapes, config.arch, folder)
    eos_ids, bos_id = _eos_ids(folder, cfg, config.vocab_size)
    weights = {name: xp.asarray(host, device=device) for name, host in _build(plan, tensors)}
    model = Model(config, xp=xp, device=device, weights=weights)
    model.eos_token_ids = eos_ids
    model.bos_token_id = bos_id
    model.path = folder
    return model
