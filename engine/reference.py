"""Oracles: the naive concatenating cache, and greedy decoding by full recompute.

``ConcatKVCache`` is the cache the project exists to replace: every ``append``
concatenates the new rows onto the old ones, one reallocation and a full copy of
the layer's history per call, so a generation of n tokens copies O(n^2) rows. It
is kept because it is obviously correct, and tests and benchmarks compare
``KVCache`` against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kvcache_xp import get_namespace
from kvcache_xp.backends import floating_dtype

__all__ = ["ConcatKVCache", "greedy_recompute"]


class ConcatKVCache:
    """Same ``append`` interface as ``KVCache``, growing by concatenation.

    ``ConcatKVCache(n_layers, d_model, dtype=numpy.float32, *, xp=None, device=None)``.
    It has no capacity limit and does only the checks a naive cache would.
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        dtype: Any = np.float32,
        *,
        xp: Any = None,
        device: Any = None,
    ) -> None:
        self.xp = xp = get_namespace(xp, dtype)
        self.n_layers, self.d_model = n_layers, d_model
        self.dtype = floating_dtype(xp, dtype)
        empty = xp.zeros((0, d_model), dtype=self.dtype, device=device)
        self._keys = [empty] * n_layers
        self._values = [empty] * n_layers

    def append(self, layer_idx: int, k: Any, v: Any) -> tuple[Any, Any]:
        """Concatenate k, v ((n, d_model) or (d_model,)) onto the layer; return the whole."""
        xp = self.xp
        if k.ndim == 1:
            k, v = xp.reshape(k, (1, self.d_model)), xp.reshape(v, (1, self.d_model))
        if k.shape != v.shape or k.shape[1] != self.d_model:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (n, d_model)")
        k, v = xp.astype(k, self.dtype), xp.astype(v, self.dtype)
        self._keys[layer_idx] = xp.concat([self._keys[layer_idx], k], axis=0)
        self._values[layer_idx] = xp.concat([self._values[layer_idx], v], axis=0)
        return self._keys[layer_idx], self._values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._keys[layer_idx].shape[0]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(k.shape[0] for k in self._keys)

    @property
    def nbytes(self) -> int:
        itemsize = self.xp.finfo(self.dtype).bits // 8
        return 2 * sum(k.shape[0] for k in self._keys) * self.d_model * itemsize


def greedy_recompute(
    model: Any,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos_token_id: int | Iterable[int] | None = None,
) -> list[int]:
    """Greedy decoding with no cache at all: every step reruns ``model.forward`` on
    the whole sequence and takes the argmax of the last row. O(n^2) compute; the
    oracle that generation through any cache must reproduce token for token.
    Stops after an EOS token as ``Model.generate`` does (``None``: the model's
    ``eos_token_ids``; ``()``: never)."""
    eos = model.stop_tokens(eos_token_id)
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        logits = model.forward(tokens)  # (T, vocab)
        tokens.append(int(model.xp.argmax(logits[-1, :])))
        if tokens[-1] in eos:
            break
    return tokens[len(prompt) :]
