"""engine: a small GPT-style decoder that drives kvcache_xp's caches as production
engines do, and is their test harness.

``engine.model.Model`` is the decoder, ``engine.reference`` holds the oracles (the
naive concatenating cache and greedy decoding by full recompute), ``engine.cli``
the ``python -m engine`` demo and ``python -m engine generate``,
``engine.scheduler`` continuous batching over a paged cache (``generate_batch``),
``engine.checkpoint`` GPT-2 and Llama-family models from Hugging Face folders
(``load_model``), ``engine.text`` tokenizers, ``engine.sampling`` the samplers.
"""

from .checkpoint import CheckpointError, load_config, load_model
from .model import PRESETS, Model, ModelConfig, RopeScaling
from .reference import ConcatKVCache, greedy_recompute
from .sampling import Sampler, SamplingParams
from .scheduler import Request, Scheduler, generate_batch
from .text import Tokenizer, load_tokenizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConcatKVCache",
    "Model",
    "ModelConfig",
    "Request",
    "RopeScaling",
    "Sampler",
    "SamplingParams",
    "Scheduler",
    "Tokenizer",
    "generate_batch",
    "greedy_recompute",
    "load_config",
    "load_model",
    "load_tokenizer",
]
