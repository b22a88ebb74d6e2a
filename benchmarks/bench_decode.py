"""Decode speed of a GPT-2-small-shaped model on NumPy, against the machine's memory
bandwidth measured in the same run, and against Hugging Face Transformers (PyTorch,
CPU) on the same weights.

One decode step of a batch of one reads every weight once (the LM head is the tied
token embedding, 50257 x 768) plus the K and V rows attention reads: bytes per token
= weight bytes + 2 x layers x context x 768 x 4. Decoding cannot go faster than the
memory bandwidth divided by that; the fraction achieved is what is reported.

(a) Memory bandwidth, three ways (best of several): a matrix-vector product over a
    1 GiB matrix (read only, what decoding does), a copy (read + write), a sum.
(b) Weight layout: one pass over GPT-2 small's 48 matrices plus the head with
    x (1, in) @ W, W stored (in, out), against x @ W.T with W stored (out, in) (the
    model's layout).
(c) Decode tokens/s at context 128 and 1024: engine's Model (NumPy, KVCache),
    Transformers' GPT2LMHeadModel with its own KV cache (torch, float32), and
    llama.cpp (through llama-cpp-python; float32 GGUF written here from the same
    tensors, float32 KV cache), the same random checkpoint (written once by
    save_pretrained). Each comparison runs where its package is installed:
    ``pip install -e '.[hf]' torch==2.13.0`` and ``pip install llama-cpp-python gguf``
    (which builds llama.cpp from source: about four minutes here).

    python benchmarks/bench_decode.py          # about two minutes here
    python benchmarks/bench_decode.py --quick  # smaller and shorter (smoke test)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from engine import load_model
from engine.model import PRESETS, Model, ModelConfig


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bandwidth(megabytes: int, repeats: int) -> dict[str, float]:
    """Bytes per second, three ways."""
    n = megabytes * 2**20 // 4
    a = np.ones((n // 4096, 4096), np.float32)
    v = np.ones(4096, np.float32)
    b = np.empty_like(a)
    out = {
        "matrix-vector product (read)": a.nbytes / best_of(lambda: a @ v, repeats),
        "copy (read + write)": 2 * a.nbytes / best_of(lambda: np.copyto(b, a), repeats),
        "sum (read)": a.nbytes / best_of(lambda: a.sum(), repeats),
    }
    return out


def layout(config: ModelConfig, repeats: int) -> dict[str, float]:
    """Seconds per pass over every matrix of one decode step, two layouts."""
    rng = np.random.default_rng(0)
    d, f, v = config.d_model, config.hidden_dim, config.vocab_size
    shapes = [(d, 3 * d), (d, d), (d, f), (f, d)] * config.n_layers + [(d, v)]
    in_out = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    out_in = [np.ascontiguousarray(w.T) for w in in_out]
    xs = {n: rng.standard_normal((1, n), dtype=np.float32) for n in (d, f)}

    def run_in_out():
        for w in in_out:
            xs[w.shape[0]] @ w

    def run_out_in():
        for w in out_in:
            xs[w.shape[1]] @ w.T

    result = {}
    for _ in range(2):  # interleaved, twice
        result["x @ W, W stored (in, out)"] = best_of(run_in_out, repeats)
        result["x @ W.T, W stored (out, in) (the model's)"] = best_of(run_out_in, repeats)
    result["bytes"] = sum(w.nbytes for w in in_out)
    return result


def ours_decode(model: Model, prompt: list[int], steps: int) -> tuple[float, list[int]]:
    cache = model.make_cache(len(prompt) + steps)
    argmax = model.xp.argmax
    token = int(argmax(model.prefill(prompt, cache)))
    tokens = []
    start = time.perf_counter()
    for _ in range(steps):
        token = int(argmax(model.decode_step(token, cache)))
        tokens.append(token)
    return steps / (time.perf_counter() - start), tokens


def hf_decode(hf, torch, prompt: list[int], steps: int) -> tuple[float, list[int]]:
    tokens = []
    with torch.inference_mode():
        out = hf(torch.tensor([prompt]), use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            out = hf(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        return steps / (time.perf_counter() - start), tokens


def write_gpt2_gguf(folder: str, path: str, config: ModelConfig) -> None:
    """The folder's GPT-2 tensors as a float32 GGUF file for llama.cpp (its ``gpt2``
    architecture; Conv1D weights transposed to (out, in), as its converter does). The
    vocabulary is placeholder text: only token ids pass between the two."""
    import gguf

    from engine.checkpoint import SafetensorsFile

    st = SafetensorsFile(Path(folder) / "model.safetensors")
    t = {k.removeprefix("transformer."): k for k in st.tensors}
    c = config
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_block_count(c.n_layers)
    w.add_head_count(c.n_heads)
    w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_types([gguf.TokenType.NORMAL] * c.vocab_size)
    w.add_token_merges(["<t0> <t1>"])
    w.add_eos_token_id(c.vocab_size - 1)

    def add(name: str, key: str, transpose: bool = False) -> None:
        value = st.read(t[key])
        w.add_tensor(name, np.ascontiguousarray(value.T) if transpose else value)

    add("token_embd.weight", "wte.weight")
    add("position_embd.weight", "wpe.weight")
    for i in range(c.n_layers):
        h, b = f"h.{i}.", f"blk.{i}."
        for ours, theirs, matrix in [
            ("attn_norm", "ln_1", False),
            ("attn_qkv", "attn.c_attn", True),
            ("attn_output", "attn.c_proj", True),
            ("ffn_norm", "ln_2", False),
            ("ffn_up", "mlp.c_fc", True),
            ("ffn_down", "mlp.c_proj", True),
        ]:
            add(b + ours + ".weight", h + theirs + ".weight", matrix)
            add(b + ours + ".bias", h + theirs + ".bias")
    add("output_norm.weight", "ln_f.weight")
    add("output_norm.bias", "ln_f.bias")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_decode(llm, prompt: list[int], steps: int, vocab: int) -> tuple[float, list[int]]:
    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    llm.reset()
    llm.eval(prompt)
    token = int(np.argmax(last_logits()))
    tokens = []
    start = time.perf_counter()
    for _ in range(steps):
        llm.eval([token])
        token = int(np.argmax(last_logits()))
        tokens.append(token)
    return steps / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer model, few steps")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per context (best is shown)")
    args = parser.parse_args()
    config = PRESETS["gpt2"]
    config = ModelConfig(
        config.vocab_size, config.d_model, 4 if args.quick else config.n_layers,
        config.n_heads, config.max_seq_len, name="gpt2", tie_word_embeddings=True,
    )  # fmt: skip
    steps, runs = (8, 1) if args.quick else (args.steps, args.runs)
    contexts = (128,) if args.quick else (128, 1024)
    print(
        f"# Decode speed against memory bandwidth\n\nMachine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, NumPy {np.__version__}. "
        f"Model: GPT-2-small-shaped ({config.n_layers} layers, {config.n_heads} heads, "
        f"{config.d_model} wide, vocab {config.vocab_size}, tied head), random weights, "
        "float32, batch 1, greedy.\n"
    )
    bw = bandwidth(256 if args.quick else 1024, 3 if args.quick else 8)
    print("## (a) Memory bandwidth, measured now\n\n| method | GB/s |\n|---|---:|")
    for name, value in bw.items():
        print(f"| {name} | {value / 1e9:.1f} |")
    limit_bw = max(bw.values())
    print(f"\nThe limit below uses the highest: {limit_bw / 1e9:.1f} GB/s.\n")

    lay = layout(config, 3 if args.quick else 10)
    nbytes = lay.pop("bytes")
    print(
        f"## (b) Weight layout: one pass over the {config.n_layers * 4 + 1} matrices "
        f"({nbytes / 2**20:.0f} MiB) of a decode step\n\n| layout | ms | GB/s |\n|---|---:|---:|"
    )
    for name, seconds in lay.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.1f} |")

    try:
        import torch
        import transformers
    except ImportError:
        torch = transformers = None
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    with tempfile.TemporaryDirectory() as tmp:
        hf = on_torch = llm = None
        if transformers is not None:
            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values naming
            torch.manual_seed(0)
            hf_config = transformers.GPT2Config(
                vocab_size=config.vocab_size, n_embd=config.d_model, n_layer=config.n_layers,
                n_head=config.n_heads, n_positions=config.max_seq_len,
            )  # fmt: skip
            hf = transformers.GPT2LMHeadModel(hf_config).eval()
            hf.save_pretrained(tmp)
            model = load_model(tmp)
            on_torch = load_model(tmp, xp=torch)
            source = f"Transformers {transformers.__version__} GPT2LMHeadModel, saved and loaded"
            if llama_cpp is not None:
                gguf_path = str(Path(tmp) / "gpt2-f32.gguf")
                write_gpt2_gguf(tmp, gguf_path, config)
                llm = llama_cpp.Llama(
                    model_path=gguf_path, n_ctx=config.max_seq_len, n_batch=512,
                    n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(),
                    type_k=0, type_v=0, verbose=False,  # 0: GGML_TYPE_F32, as ours
                )  # fmt: skip
                source += f"; llama.cpp via llama-cpp-python {llama_cpp.__version__}, F32 GGUF"
        else:
            model = Model(config, seed=0)
            source = "seeded weights (Transformers not installed: no comparison)"
        weight_bytes = model.weight_nbytes - 4 * config.max_seq_len * config.d_model  # wpe: 1 row
        print(
            f"\n## (c) Decode tokens/s ({source}; {steps} steps timed, best of {runs})\n\n"
            f"Weights read per token: {weight_bytes / 2**20:.1f} MiB. Threads: "
            f"{os.cpu_count()} (torch: {torch.get_num_threads() if torch else '-'}).\n\n"
            "| context | KV read/token (MiB) | bandwidth limit (tok/s) | engine NumPy (tok/s) "
            "| fraction of limit | engine on torch (tok/s) | Transformers torch (tok/s) "
            "| engine / Transformers | llama.cpp (tok/s) | engine / llama.cpp "
            "| same tokens |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        )
        rng = np.random.default_rng(0)
        for context in contexts:
            prompt = [int(t) for t in rng.integers(0, config.vocab_size, context - steps)]
            kv_bytes = 2 * config.n_layers * context * config.d_model * 4
            limit = limit_bw / (weight_bytes + kv_bytes)
            ours = [ours_decode(model, prompt, steps) for _ in range(runs)]
            rate = max(r for r, _ in ours)
            cells = [f"{rate:.1f}", f"{rate / limit:.0%}"]
            same = []
            if hf is not None:
                with torch.inference_mode():
                    torch_rate = max(ours_decode(on_torch, prompt, steps)[0] for _ in range(runs))
                theirs = [hf_decode(hf, torch, prompt, steps) for _ in range(runs)]
                hf_rate = max(r for r, _ in theirs)
                cells += [f"{torch_rate:.1f}", f"{hf_rate:.1f}", f"{rate / hf_rate:.2f}x"]
                same.append(f"Transformers {'yes' if theirs[0][1] == ours[0][1] else 'no'}")
            else:
                cells += ["-", "-", "-"]
            if llm is not None:
                lc = [llama_cpp_decode(llm, prompt, steps, config.vocab_size) for _ in range(runs)]
                lc_rate = max(r for r, _ in lc)
                cells += [f"{lc_rate:.1f}", f"{rate / lc_rate:.2f}x"]
                same.append(f"llama.cpp {'yes' if lc[0][1] == ours[0][1] else 'no'}")
            else:
                cells += ["-", "-"]
            cells.append(", ".join(same) or "-")
            print(
                f"| {context} | {kv_bytes / 2**20:.1f} | {limit:.1f} | " + " | ".join(cells) + " |"
            )


if __name__ == "__main__":
    main()
