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

import operator
from typing import Any, NoReturn

import array_api_compat
import numpy as np

from .backends import FLOATING_DTYPE_NAMES, floating_dtype, get_namespace
from .errors import (
    CacheOverflowError,
    DeviceMismatchError,
    DtypeError,
    KVMismatchError,
    LayerIndexError,
    LengthError,
    NamespaceMismatchError,
    ShapeError,
)

__all__ = ["KVCache"]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


class KVCache:
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
        self.n_layers = _positive_int("n_layers", n_layers)
        self.d_model = _positive_int("d_model", d_model)
        self.max_seq_len = _positive_int("max_seq_len", max_seq_len)
        self.xp = xp = get_namespace(xp, dtype)
        shape = (self.n_layers, self.max_seq_len, self.d_model)
        # (n_layers, max_seq_len, d_model) each, allocated once.
        self._keys = xp.zeros(shape, dtype=floating_dtype(xp, dtype), device=device)
        self._values = xp.zeros(shape, dtype=self._keys.dtype, device=device)
        self.dtype = self._keys.dtype
        self.device = self._keys.device
        self._array_type = type(self._keys)
        # The dtypes `append` accepts and casts: every real floating dtype of xp,
        # as array `.dtype` objects so that membership is a hash lookup.
        self._castable_dtypes = frozenset(
            xp.empty((0,), dtype=getattr(xp, name), device=self.device).dtype
            for name in FLOATING_DTYPE_NAMES
            if hasattr(xp, name)
        )
        self._itemsize = xp.finfo(self.dtype).bits // 8
        self._row_shape = (self.d_model,)
        # NumPy arrays all live on the CPU: there is no device to mismatch.
        self._check_devices = not array_api_compat.is_numpy_namespace(xp)
        self._positions = [0] * self.n_layers

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
        if type(layer_idx) is not int or not 0 <= layer_idx < self.n_layers:
            layer_idx = self._check_layer(layer_idx)
        if type(k) is not self._array_type or type(v) is not self._array_type:
            self._check_array_types(k, v)
        if self._check_devices and (k.device != self.device or v.device != self.device):
            self._raise_device(k, v)
        shape = k.shape
        if shape != v.shape:
            self._raise_shape(k, v)
        pos = self._positions[layer_idx]
        if shape == self._row_shape:  # decode: one (d_model,) row
            end = pos + 1
            rows = pos  # an integer index writes the row itself
        elif len(shape) == 2 and shape[1] == self.d_model:  # prefill: (n, d_model)
            end = pos + shape[0]
            rows = slice(pos, end)
        else:
            self._raise_shape(k, v)
        if end > self.max_seq_len:
            self._raise_overflow(layer_idx, pos, end)
        if k.dtype is not self.dtype:
            k = self._cast(k, "k")
        if v.dtype is not self.dtype:
            v = self._cast(v, "v")
        # Every check passed: only now is anything written.
        self._keys[layer_idx, rows, :] = k
        self._values[layer_idx, rows, :] = v
        self._positions[layer_idx] = end
        return self._keys[layer_idx, :end, :], self._values[layer_idx, :end, :]

    # -- state --------------------------------------------------------------------

    @property
    def lengths(self) -> tuple[int, ...]:
        """The number of filled rows of each layer."""
        return tuple(self._positions)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The number of filled rows of one layer (the position its next row goes to)."""
        return self._positions[self._check_layer(layer_idx)]

    def view(self, layer_idx: int) -> tuple[Any, Any]:
        """Views ``(K, V)`` of the filled rows of a layer, without appending."""
        layer_idx = self._check_layer(layer_idx)
        end = self._positions[layer_idx]
        return self._keys[layer_idx, :end, :], self._values[layer_idx, :end, :]

    def reset(self) -> None:
        """Empty every layer. The buffers are kept (and not cleared): no reallocation."""
        self._positions = [0] * self.n_layers

    def rollback(self, length: int) -> None:
        """Shorten every layer longer than ``length`` to its first ``length`` rows.

        Speculative decoding uses this to drop rejected draft tokens. Layers already
        no longer than ``length`` are left as they are. Dropped rows are forgotten,
        not cleared: the next append overwrites them. Raises ``LengthError`` (and
        changes nothing) unless ``0 <= length <= max(lengths)``.
        """
        if isinstance(length, bool):
            raise LengthError(f"rollback length must be an int, got {length!r}")
        try:
            length = operator.index(length)
        except TypeError:
            raise LengthError(f"rollback length must be an int, got {length!r}") from None
        longest = max(self._positions)
        if not 0 <= length <= longest:
            raise LengthError(
                f"cannot roll back to length {length}: it must be in [0, {longest}], "
                f"the longest layer's length (lengths are {self.lengths})"
            )
        self._positions = [min(position, length) for position in self._positions]

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

    # -- error paths (off the hot path) ---------------------------------------------

    def _check_layer(self, layer_idx: Any) -> int:
        if isinstance(layer_idx, bool):
            raise LayerIndexError(f"layer_idx must be an int, got {layer_idx!r}")
        try:
            index = operator.index(layer_idx)
        except TypeError:
            raise LayerIndexError(
                f"layer_idx must be an int, got {type(layer_idx).__name__}"
            ) from None
        if not 0 <= index < self.n_layers:
            raise LayerIndexError(
                f"layer_idx {index} is out of range: the cache has {self.n_layers} layers "
                f"(0..{self.n_layers - 1})"
            )
        return index

    def _check_array_types(self, k: Any, v: Any) -> None:
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, self._array_type):
                raise NamespaceMismatchError(
                    f"{name} is a {type(x).__module__}.{type(x).__qualname__}; the cache "
                    f"holds {self._array_type.__module__}.{self._array_type.__qualname__} "
                    f"arrays ({self.xp.__name__})"
                )

    def _raise_device(self, k: Any, v: Any) -> NoReturn:
        name, x = ("k", k) if k.device != self.device else ("v", v)
        raise DeviceMismatchError(
            f"{name} is on device {x.device}; the cache is on device {self.device}"
        )

    def _raise_shape(self, k: Any, v: Any) -> NoReturn:
        expected = f"(n, {self.d_model}) or ({self.d_model},)"
        for name, x in (("k", k), ("v", v)):
            shape = tuple(x.shape)
            if len(shape) not in (1, 2):
                raise ShapeError(
                    f"{name} has shape {shape} (rank {len(shape)}); expected {expected}"
                )
            if shape[-1] != self.d_model:
                raise ShapeError(
                    f"{name} has width {shape[-1]} (shape {shape}); the cache holds "
                    f"{self.d_model}: expected {expected}"
                )
        raise KVMismatchError(
            f"k has shape {tuple(k.shape)} but v has shape {tuple(v.shape)}; they must match"
        )

    def _raise_overflow(self, layer_idx: int, pos: int, end: int) -> NoReturn:
        raise CacheOverflowError(
            f"layer {layer_idx} holds {pos} of {self.max_seq_len} rows; appending "
            f"{end - pos} would need {end} rows, past max_seq_len={self.max_seq_len}"
        )

    def _cast(self, x: Any, name: str) -> Any:
        if x.dtype == self.dtype:  # an equal dtype object that is not the same one
            return x
        if x.dtype not in self._castable_dtypes:
            raise DtypeError(
                f"{name} has dtype {x.dtype}; the cache takes real floating input "
                f"(cast on write to {self.dtype})"
            )
        return self.xp.astype(x, self.dtype)
