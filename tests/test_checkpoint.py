"""engine.checkpoint: Hugging Face folders (GPT-2, Llama with GQA, Llama 3 rope
scaling, Qwen2) load on every backend and compute what an independent float64
reference computes from the same tensors by their Hugging Face names; generation
through KVCache equals full recompute; every malformed folder is refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from checkpoints import (
    CONFIGS,
    GPT2,
    LLAMA3,
    LLAMA_GQA,
    reference_logits,
    rounded,
    safetensors_bytes,
    tensors_for,
    to_bf16_bits,
    write_folder,
)
from helpers import host

from engine import CheckpointError, load_config, load_model
from engine.checkpoint import SafetensorsFile
from engine.reference import ConcatKVCache, greedy_recompute

TOKENS = [3, 17, 42, 8, 91, 5, 60, 33, 12, 77, 1, 64, 29, 50, 7, 88, 19, 45, 70, 2, 36, 81]


@pytest.fixture(params=list(CONFIGS), scope="module")
def arch_folder(request, tmp_path_factory):
    name = request.param
    cfg = CONFIGS[name]
    tensors = tensors_for(cfg, seed=1)
    folder = write_folder(tmp_path_factory.mktemp(name), cfg, tensors)
    return name, cfg, tensors, folder


def test_logits_match_the_independent_reference(arch_folder, xp, device):
    _, cfg, tensors, folder = arch_folder
    model = load_model(folder, xp=xp, device=device)
    ours = host(model.forward(TOKENS))
    expected = reference_logits(cfg, tensors, TOKENS)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_generation_through_kvcache_equals_full_recompute(arch_folder, xp, device):
    _, cfg, tensors, folder = arch_folder
    model = load_model(folder, xp=xp, device=device)
    prompt = TOKENS[:5]
    tokens = model.generate(prompt, 40, eos_token_id=())
    assert tokens == greedy_recompute(model, prompt, 40, eos_token_id=())
    concat = ConcatKVCache(model.config.n_layers, model.config.kv_dim, xp=xp, device=device)
    assert tokens == model.generate(prompt, 40, cache=concat, eos_token_id=())
    assert len(set(tokens)) >= 5, tokens  # one repeated token would prove little
    # and the reference agrees with the first generated token
    assert tokens[0] == int(np.argmax(reference_logits(cfg, tensors, prompt)[-1]))


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_checkpoints_load_exactly(dtype, tmp_path, xp, device):
    cfg = LLAMA_GQA
    tensors = tensors_for(cfg, seed=2)
    model = load_model(write_folder(tmp_path, cfg, tensors, dtype=dtype), xp=xp, device=device)
    # each weight is exactly the stored half-precision value, widened to float32
    q = host(model.weights["h0.attn.w_qkv"])[: 8 * 8]
    np.testing.assert_array_equal(
        q, rounded(tensors["model.layers.0.self_attn.q_proj.weight"], dtype)
    )
    expected = reference_logits(cfg, tensors, TOKENS, dtype)
    ours = host(model.forward(TOKENS))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_bf16_bits_widen_exactly(tmp_path):
    values = np.array([0.0, -0.0, 1.0, -2.5, 3.140625, 1e-40, np.inf, -np.inf, 65504.0], np.float32)
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({"x": values}, "BF16"))
    read = SafetensorsFile(path).read("x")
    widened = (to_bf16_bits(values).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(read.view(np.uint32), widened.view(np.uint32))
    assert read.dtype == np.float32


def test_gqa_cache_is_kv_heads_wide(tmp_path):
    model = load_model(write_folder(tmp_path, LLAMA_GQA, tensors_for(LLAMA_GQA)))
    c = model.config
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.q_dim, c.kv_dim) == (8, 2, 8, 64, 16)
    cache = model.make_cache(32)
    model.prefill(TOKENS[:6], cache)
    assert cache.d_model == 16 and cache.lengths == (6, 6)
    assert cache.nbytes == 2 * 2 * 32 * 16 * 4


def test_sharded_checkpoint_equals_single_file(tmp_path, xp, device):
    cfg, tensors = LLAMA3, tensors_for(LLAMA3, seed=4)
    single = load_model(write_folder(tmp_path / "one", cfg, tensors), xp=xp, device=device)
    sharded = load_model(
        write_folder(tmp_path / "three", cfg, tensors, shards=3), xp=xp, device=device
    )
    assert len(list((tmp_path / "three").glob("*.safetensors"))) == 3
    np.testing.assert_array_equal(host(single.forward(TOKENS)), host(sharded.forward(TOKENS)))


def test_gpt2_hub_names_and_save_pretrained_names_load_the_same(tmp_path):
    prefixed = tensors_for(GPT2, seed=5)  # save_pretrained: transformer.*, no lm_head
    hub = {k.removeprefix("transformer."): w for k, w in prefixed.items()}
    n = GPT2["n_positions"]
    for i in range(GPT2["n_layer"]):  # the original files' attention mask buffers
        hub[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, n, n), np.float32))
        hub[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    a = load_model(write_folder(tmp_path / "a", GPT2, prefixed))
    b = load_model(write_folder(tmp_path / "b", GPT2, hub))
    np.testing.assert_array_equal(a.forward(TOKENS), b.forward(TOKENS))
    assert "h0.attn.w_qkv" in a.weights and not any(k[-4:] == "bias" for k in a.weights)


def test_untied_gpt2_and_tied_llama(tmp_path):
    untied = GPT2 | {"tie_word_embeddings": False}
    tensors = tensors_for(untied, seed=6)
    assert "lm_head.weight" in tensors
    model = load_model(write_folder(tmp_path / "g", untied, tensors))
    expected = reference_logits(untied, tensors, TOKENS)
    np.testing.assert_allclose(model.forward(TOKENS), expected, rtol=1e-4, atol=1e-3)
    tied = LLAMA_GQA | {"tie_word_embeddings": True}
    tensors = tensors_for(tied, seed=6)
    assert "lm_head.weight" not in tensors
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # old files
    model = load_model(write_folder(tmp_path / "l", tied, tensors))
    expected = reference_logits(tied, tensors, TOKENS)
    np.testing.assert_allclose(model.forward(TOKENS), expected, rtol=1e-4, atol=1e-3)


def test_eos_from_generation_config_stops_generation(tmp_path):
    cfg, tensors = LLAMA_GQA, tensors_for(LLAMA_GQA, seed=1)
    free = load_model(write_folder(tmp_path / "a", cfg, tensors)).generate(
        TOKENS[:5], 30, eos_token_id=()
    )
    stop = free[6]
    first = free.index(stop)
    gen = {"eos_token_id": [stop, 10_000], "bos_token_id": 1}  # out-of-vocab ids are dropped
    model = load_model(write_folder(tmp_path / "b", cfg, tensors, generation_config=gen))
    assert model.eos_token_ids == (stop,) and model.bos_token_id == 1
    assert model.generate(TOKENS[:5], 30) == free[: first + 1]
    assert greedy_recompute(model, TOKENS[:5], 30) == free[: first + 1]
    assert model.generate(TOKENS[:5], 30, eos_token_id=()) == free
    # without a generation config, config.json's eos_token_id (2) counts
    assert load_model(tmp_path / "a").eos_token_ids == (2,)


def test_mistral_sliding_window_caps_the_context(tmp_path):
    cfg = LLAMA_GQA | {"model_type": "mistral", "sliding_window": 48}
    assert load_config(write_folder(tmp_path, cfg, tensors_for(cfg))).max_seq_len == 48
    cfg = LLAMA_GQA | {"model_type": "mistral", "sliding_window": None}
    assert load_config(write_folder(tmp_path, cfg, tensors_for(cfg))).max_seq_len == 128


# -- malformed folders ------------------------------------------------------------


def _break_tensors(change):
    def apply(folder, cfg, tensors):
        change(tensors)
        write_folder(folder, cfg, tensors)

    return apply


def _break_config(change):
    def apply(folder, cfg, tensors):
        cfg = json.loads(json.dumps(cfg))
        change(cfg)
        write_folder(folder, cfg, tensors)

    return apply


def _break_bytes(change):
    def apply(folder, cfg, tensors):
        write_folder(folder, cfg, tensors)
        file = folder / "model.safetensors"
        file.write_bytes(change(file.read_bytes()))

    return apply


def _header_edit(edit):
    """Rewrite the JSON header, keeping the data."""

    def change(data):
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        edit(header)
        text = json.dumps(header).encode()
        return len(text).to_bytes(8, "little") + text + data[8 + n :]

    return change


def _no_config(folder, cfg, tensors):
    write_folder(folder, cfg, tensors)
    (folder / "config.json").unlink()


def _pickle_only(folder, cfg, tensors):
    write_folder(folder, cfg, tensors)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")


def _sharded(edit):
    def apply(folder, cfg, tensors):
        write_folder(folder, cfg, tensors, shards=2)
        edit(folder)

    return apply


def _index_edit(change):
    def edit(folder):
        path = folder / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        change(index["weight_map"])
        path.write_text(json.dumps(index))

    return _sharded(edit)


Q0 = "model.layers.0.self_attn.q_proj.weight"
BAD_FOLDERS = {
    "no config": (_no_config, "no config.json"),
    "missing tensor": (_break_tensors(lambda t: t.pop(Q0)), f"missing tensor {Q0}"),
    "unexpected tensor": (
        _break_tensors(lambda t: t.update({"model.layers.0.extra.weight": np.ones(2, np.float32)})),
        "unexpected tensor model.layers.0.extra.weight",
    ),
    "shape disagrees": (
        _break_tensors(lambda t: t.update({Q0: np.ones((64, 16), np.float32)})),
        rf"tensor {Q0} has shape \[64, 16\]; config.json implies \[64, 32\]",
    ),
    "config layers disagree": (
        _break_config(lambda c: c.update(num_hidden_layers=3)),
        "missing tensor model.layers.2",
    ),
    "unsupported model_type": (
        _break_config(lambda c: c.update(model_type="falcon")),
        "model_type 'falcon' is not supported",
    ),
    "unsupported rope_scaling": (
        _break_config(lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0})),
        "rope_scaling type 'yarn' is not supported",
    ),
    "llama3 scaling incomplete": (
        _break_config(lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0})),
        "low_freq_factor is missing",
    ),
    "config key missing": (_break_config(lambda c: c.pop("hidden_size")), "hidden_size is missing"),
    "config key wrong type": (
        _break_config(lambda c: c.update(num_attention_heads="8")),
        "num_attention_heads must be int",
    ),
    "config inconsistent": (
        _break_config(lambda c: c.update(num_key_value_heads=3)),
        "multiple of n_kv_heads=3",
    ),
    "unsupported activation": (
        _break_config(lambda c: c.update(hidden_act="gelu")),
        "hidden_act 'gelu' is not supported",
    ),
    "config not json": (
        lambda f, c, t: (write_folder(f, c, t), (f / "config.json").write_text("{oops")),
        "config.json: not valid JSON",
    ),
    "truncated": (_break_bytes(lambda b: b[:-100]), "truncated: the header describes"),
    "truncated header": (_break_bytes(lambda b: b[:50]), "header length .* runs past"),
    "empty file": (_break_bytes(lambda b: b""), "too short for a safetensors file"),
    "header not json": (_break_bytes(lambda b: b[:8] + b"x" + b[9:]), "corrupt safetensors header"),
    "trailing bytes": (_break_bytes(lambda b: b + b"\0" * 8), "8 bytes after the last tensor"),
    "unsupported dtype": (
        _break_bytes(_header_edit(lambda h: h[Q0].update(dtype="I8"))),
        "dtype 'I8' is not supported",
    ),
    "offsets disagree with shape": (
        _break_bytes(_header_edit(lambda h: h[Q0].update(shape=[64, 31]))),
        "needs 7936",
    ),
    "pickle only": (_pickle_only, "pickle files are never loaded"),
    "shard missing": (
        _sharded(lambda f: (f / "model-00002-of-00002.safetensors").unlink()),
        "shard model-00002-of-00002.safetensors .* is missing",
    ),
    "index names a tensor its shard lacks": (
        _index_edit(lambda m: m.update({Q0: next(f for f in set(m.values()) if f != m[Q0])})),
        f"tensor {Q0} is not in its shard",
    ),
    "index points outside the folder": (
        _index_edit(lambda m: m.update({Q0: "../model.safetensors"})),
        "not a file name",
    ),
    "shard holds an unlisted tensor": (
        _index_edit(lambda m: m.pop(Q0)),
        f"unexpected tensor {Q0} \\(not in model.safetensors.index.json\\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_malformed_folders_are_refused_with_the_reason(case, tmp_path):
    make, message = BAD_FOLDERS[case]
    folder = tmp_path / "model"
    folder.mkdir()
    make(folder, json.loads(json.dumps(LLAMA_GQA)), tensors_for(LLAMA_GQA))
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nowhere")


def test_gpt2_mixed_key_namings_are_refused(tmp_path):
    tensors = tensors_for(GPT2)
    tensors["wte.weight"] = tensors.pop("transformer.wte.weight")
    with pytest.raises(CheckpointError, match=r"unexpected tensor wte\.weight beside"):
        load_model(write_folder(tmp_path, GPT2, tensors))


def test_gpt2_unsupported_variants_are_refused(tmp_path):
    for change, message in [
        ({"activation_function": "relu"}, "activation_function 'relu'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "attention scale"),
    ]:
        folder = write_folder(tmp_path / str(len(message)), GPT2 | change, tensors_for(GPT2))
        with pytest.raises(CheckpointError, match=message):
            load_model(folder)


def test_files_of_the_safetensors_library_load_the_same(tmp_path):
    """The official writer and this suite's writer agree, in both directions."""
    st = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed")
    tensors = tensors_for(LLAMA_GQA, seed=8)
    ours = write_folder(tmp_path / "ours", LLAMA_GQA, tensors)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text(json.dumps(LLAMA_GQA))
    halves = {k: v.astype(np.float16) for k, v in tensors.items()}
    st.save_file(halves, str(theirs / "model.safetensors"), metadata={"format": "pt"})
    loaded = st.load_file(str(ours / "model.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)
    model = load_model(theirs)
    expected = reference_logits(LLAMA_GQA, tensors, TOKENS, "F16")
    np.testing.assert_allclose(model.forward(TOKENS), expected, rtol=1e-4, atol=1e-3)


def test_loading_holds_one_copy_of_the_weights_plus_one_tensor(tmp_path):
    """Tensor by tensor: the peak of host memory while loading (bfloat16, NumPy) is the
    model's own float32 weights plus a few times the largest single tensor, never a
    second copy of the model."""
    import tracemalloc

    cfg = LLAMA_GQA | {"num_hidden_layers": 6, "hidden_size": 128, "intermediate_size": 256}
    cfg |= {"vocab_size": 512, "head_dim": 16}
    folder = write_folder(tmp_path, cfg, tensors_for(cfg), dtype="BF16")
    load_model(folder)  # first, so that imports made on the way are not counted
    tracemalloc.start()
    try:
        model = load_model(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    largest = max(4 * int(np.prod(w.shape)) for w in model.weights.values())
    assert model.weight_nbytes > 8 * largest  # many tensors: a second copy would show
    assert peak <= model.weight_nbytes + 3 * largest, (peak, model.weight_nbytes, largest)
