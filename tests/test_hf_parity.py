"""Parity with Hugging Face Transformers (an independent implementation), where it
is installed (``pip install 'kvcache-xp[hf]'``; CI installs it): random models
saved by ``save_pretrained`` in float32 and bfloat16 load here and give the same
logits to float32 tolerance and the same greedy tokens as Transformers' own
``generate`` with its KV cache.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import load_model

torch = pytest.importorskip("torch", reason="torch is not installed")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'kvcache-xp[hf]')"
)

LLAMA = {
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
MODELS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 64, "n_layer": 2, "n_head": 4,
                                                "vocab_size": 97, "n_positions": 128}),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", LLAMA | {
        "head_dim": 16, "tie_word_embeddings": True, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    }),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA | {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", LLAMA | {"sliding_window": None}),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_same_logits_and_greedy_tokens_as_transformers(name, dtype, tmp_path):
    config_cls, model_cls, fields = MODELS[name]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields))
    with torch.no_grad():
        for p in hf.parameters():  # far from the near-uniform init, so tokens vary
            p.normal_(0.0, 0.3)
    hf.to(getattr(torch, dtype)).save_pretrained(tmp_path)
    # the reference reads the saved folder back in float32, as we do
    hf = getattr(transformers, model_cls).from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_model(tmp_path)
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 97, 40)]
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0].numpy()
        hf_tokens = hf.generate(
            torch.tensor([tokens[:6]]), max_new_tokens=30, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, 6:].tolist()  # fmt: skip
    logits = np.asarray(ours.forward(tokens))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert ours.generate(tokens[:6], 30, eos_token_id=()) == hf_tokens
