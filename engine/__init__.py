"""engine: a small GPT-style decoder that drives kvcache_xp's caches as production
engines do, and is their test harness.

``engine.model.Model`` is the decoder, ``engine.reference`` holds the oracles (the
naive concatenating cache and greedy decoding by full recompute), ``engine.cli``
the ``python -m engine`` demo, ``engine.scheduler`` continuous batching over a
paged cache (``generate_batch``).
"""

from .model import PRESETS, Model, ModelConfig
from .reference import ConcatKVCache, greedy_recompute
from .scheduler import Request, Scheduler, generate_batch

__all__ = [
    "PRESETS",
    "ConcatKVCache",
    "Model",
    "ModelConfig",
    "Request",
    "Scheduler",
    "generate_batch",
    "greedy_recompute",
]
