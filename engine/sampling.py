"""Choosing the next token from logits: greedy, or sampled with temperature, top-k
and top-p (nucleus), from a seeded NumPy Generator so a run repeats exactly.

The filters apply in Hugging Face's order: temperature, then top-k, then top-p.
Top-k keeps every token tied with the k-th largest logit; top-p keeps the smallest
set of most likely tokens whose probability reaches ``top_p`` (at least one).
Sampling happens on the host in float64: one ``(vocab,)`` copy per token.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvcache_xp import get_namespace
from kvcache_xp.backends import to_numpy

__all__ = ["Sampler", "SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy (argmax; top-k, top-p and seed are then unused)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no top-p filter
    seed: int | None = None  # None: fresh entropy, not reproducible

    def __post_init__(self) -> None:
        # NumPy scalars are welcome; bools are not numbers here
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if _index(self.top_k) is None or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {p!r}")
        if self.seed is not None and (_index(self.seed) is None or self.seed < 0):
            raise ValueError(f"seed must be an int >= 0 or None, got {self.seed!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", operator.index(self.top_k))
        object.__setattr__(self, "top_p", float(p))
        if self.seed is not None:
            object.__setattr__(self, "seed", operator.index(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _index(value: Any) -> int | None:
    """``value`` as an int if it is an integer (NumPy's too) and not a bool, else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


class Sampler:
    """``Sampler(params, xp)(logits) -> int``: the next token from ``(vocab,)`` logits.

    One sampler serves one generation: its Generator advances with every token, so
    the same seed, model and prompt give the same tokens run after run.
    """

    def __init__(self, params: SamplingParams | None = None, xp: Any = None) -> None:
        self.params = params = params or SamplingParams()
        self._argmax = get_namespace(xp).argmax
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: Any) -> int:
        p = self.params
        if p.greedy:
            return int(self._argmax(logits))
        return int(self.pick(to_numpy(logits)))

    def pick(self, logits: np.ndarray) -> int:
        """Sample from host logits with the filters applied."""
        p = self.params
        x = np.asarray(logits, dtype=np.float64) / p.temperature
        if 0 < p.top_k < x.shape[0]:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x < kth, -np.inf, x)
        x = np.exp(x - np.max(x))
        probs = x / np.sum(x)
        if p.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            sorted_probs = probs[order]
            before = np.cumsum(sorted_probs) - sorted_probs  # mass of the likelier tokens
            keep = order[before < p.top_p]  # always holds the most likely token
            filtered = np.zeros_like(probs)
            filtered[keep] = probs[keep]
            probs = filtered / np.sum(filtered)
        cdf = np.cumsum(probs)
        index = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return min(index, probs.shape[0] - 1)
