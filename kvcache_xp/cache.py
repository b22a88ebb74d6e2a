"""The contiguous, preallocated KV cache.

One K and one V buffer of shape ``(n_layers, max_seq_len, d_model)`` are allocated
once. Each layer keeps a write position; ``append`` slice-writes the new rows at
that position and returns views of the filled rows ``[0, pos)`` of the layer: no
reallocation, no copy of history, no trailing empty rows. This is the pattern of
nanochat's ``KVCache``, Hugging Face's ``StaticCache`` and the per-sequence slots
of the production engines.

The code uses only the Python array API standard, so it runs unchanged on NumPy,
CuPy, PyTorch and array-api-strict. The namespace is resolved once, in
``__init__``; ``append`` makes no namespace lookup.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._base import LayeredCache, positive_int
from .backends import floating_dtype, get_namespace

__all__ = ["KVCache"]


class KVCache(LayeredCache):
    """Preallocated per-layer key/value cache with slice writes and view returns.

    Parameters
    ----------
    n_layers, d_model, max_seq_len : int
        The buffers have shape ``(n_layers, max_seq_len, d_model)``; ``d_model`` is
        the row width (``n_kv_heads * head_dim`` for grouped-query attention).
    dtype : dtype or str, default ``numpy.float32``
        The storage dtype: a real floating dtype of any library, or its name,
        mapped by name into ``xp``. It never changes: input is cast on write.
    xp : module, optional
        The array namespace (``numpy``, ``torch``, ``cupy``, ``array_api_strict``,
        or their array-api-compat wrappers). ``None`` infers it from ``dtype``'s
        library (torch, array-api-strict), else NumPy.
    device : optional
        Where the buffers live, in ``xp``'s terms (``"cuda"`` for torch...).

    Raises
    ------
    UnsupportedBackendError
        For JAX, whose immutable arrays cannot hold an in-place cache.
    BackendUnavailableError
        For CuPy without a GPU.
    DtypeError
        For a non-floating dtype or one the backend lacks (float16 on array-api-strict).
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        max_seq_len: int,
        dtype: Any = np.float32,
        *,
        xp: Any = None,
        device: Any = None,
    ) -> None:
        self.n_layers = positive_int("n_layers", n_layers)
        self.d_model = positive_int("d_model", d_model)
        self.max_seq_len = positive_int("max_seq_len", max_seq_len)
        xp = get_namespace(xp, dtype)
        shape = (self.n_layers, self.max_seq_len, self.d_model)
        # (n_layers, max_seq_len, d_model) each, allocated once.
        self._keys = xp.zeros(shape, dtype=floating_dtype(xp, dtype), device=device)
        self._values = xp.zeros(shape, dtype=self._keys.dtype, device=device)
        self.dtype = self._keys.dtype
        self._itemsize = xp.finfo(self.dtype).bits // 8
        self._init_layers(xp, self._keys, self.dtype)

    # -- the hot path -------------------------------------------------------------

    def append(self, layer_idx: int, k: Any, v: Any) -> tuple[Any, Any]:
        """Write ``k``, ``v`` at the layer's position; return views of its filled rows.

        Parameters
        ----------
        layer_idx : int
            The layer, in ``[0, n_layers)``.
        k, v : arrays of the cache's namespace and device, real floating dtype
            ``(n, d_model)`` (a prefill of n rows, n may be 0) or ``(d_model,)``
            (one decode row). Cast to the cache dtype on write.

        Returns
        -------
        K_full, V_full : arrays ``(pos + n, d_model)`` of the cache dtype
            Views of rows ``[0, pos + n)`` of the layer's preallocated buffers: no
            copy. A later ``append``, ``rollback`` or ``reset`` may overwrite the
            rows they show.

        Raises
        ------
        LayerIndexError, NamespaceMismatchError, DeviceMismatchError, DtypeError,
        ShapeError, KVMismatchError, CacheOverflowError
            See :mod:`kvcache_xp.errors`. After any of them the cache is exactly as
            before the call.
        """
        if (  # the decode fast path: one valid row in the cache dtype, nothing to cast
            type(layer_idx) is int
            and 0 <= layer_idx < self.n_layers
            and type(k) is self._array_type
            and type(v) is self._array_type
            and k.shape == self._row_shape
            and v.shape == self._row_shape
            and k.dtype is self.dtype
            and v.dtype is self.dtype
            and (self._single_device or (k.device == self.device and v.device == self.device))
        ):
            rows = self._positions[layer_idx]
            end = rows + 1
            if end > self.max_seq_len:
                self._raise_overflow(layer_idx, rows, end)
        else:  # prefill, a cast, or bad input
            layer_idx, rows, end, k, v = self._prepare(layer_idx, k, v)
        # Every check passed: only now is anything written.
        keys, values = self._keys, self._values
        keys[layer_idx, rows, :] = k
        values[layer_idx, rows, :] = v
        self._positions[layer_idx] = end
        return keys[layer_idx, :end, :], values[layer_idx, :end, :]

    def view(self, layer_idx: int) -> tuple[Any, Any]:
        """Views ``(K, V)`` of the filled rows of a layer, without appending."""
        layer_idx = self._check_layer(layer_idx)
        end = self._positions[layer_idx]
        return self._keys[layer_idx, :end, :], self._values[layer_idx, :end, :]

    @property
    def nbytes(self) -> int:
        """Bytes held by the K and V buffers (allocated, whether filled or not)."""
        return 2 * self.n_layers * self.max_seq_len * self.d_model * self._itemsize

    def __repr__(self) -> str:
        return (
            f"KVCache(n_layers={self.n_layers}, d_model={self.d_model}, "
            f"max_seq_len={self.max_seq_len}, dtype={self.dtype}, "
            f"xp={self.xp.__name__}, device={self.device}, lengths={self.lengths})"
        )
