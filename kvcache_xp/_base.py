"""The machinery every kvcache_xp cache shares: per-layer positions, input validation.

A cache built on ``LayeredCache`` keeps one write position per layer and accepts
``append(layer_idx, k, v)`` with ``k``, ``v`` of shape ``(n, d_model)`` (prefill) or
``(d_model,)`` (one decode row). ``_prepare`` is the one validator: it checks the
layer, the namespace, the device, the shapes, the capacity and the dtype, casts to
the cache's input dtype, and only then does the subclass write anything, so a
rejected call leaves the cache exactly as it was.
"""

from __future__ import annotations

import operator
from typing import Any, NoReturn

import array_api_compat

from .backends import FLOATING_DTYPE_NAMES
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

__all__ = ["LayeredCache", "as_int", "positive_int"]


def as_int(value: Any, error: type[Exception], message: str) -> int:
    """``value`` as a Python int (numpy integers too, bools not), else ``error(message)``."""
    if isinstance(value, bool):
        raise error(message)
    try:
        return operator.index(value)
    except TypeError:
        raise error(message) from None


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a TypeError/ValueError naming ``name``."""
    value = as_int(value, TypeError, f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


class LayeredCache:
    """Per-layer write positions and the append validator, shared by the caches.

    A subclass calls ``_init_layers`` once its buffers exist, passing one of them
    (for the namespace's array type and device) and the dtype input is cast to.
    """

    n_layers: int
    d_model: int
    max_seq_len: int

    def _init_layers(self, xp: Any, buffer: Any, input_dtype: Any) -> None:
        self.xp = xp
        self.device = buffer.device
        self._array_type = type(buffer)
        self._input_dtype = input_dtype
        # The dtypes `append` accepts and casts: every real floating dtype of xp,
        # as array `.dtype` objects so that membership is a hash lookup.
        self._castable_dtypes = frozenset(
            xp.empty((0,), dtype=getattr(xp, name), device=self.device).dtype
            for name in FLOATING_DTYPE_NAMES
            if hasattr(xp, name)
        )
        self._row_shape = (self.d_model,)
        # NumPy arrays all live on the CPU: there is no device to mismatch.
        self._single_device = array_api_compat.is_numpy_namespace(xp)
        self._positions = [0] * self.n_layers

    def _init_layers_like(self, other: LayeredCache) -> None:
        """``_init_layers`` with the backend facts another cache already computed."""
        for name in (
            "xp", "device", "_array_type", "_input_dtype", "_castable_dtypes", "_row_shape",
            "_single_device",
        ):  # fmt: skip
            setattr(self, name, getattr(other, name))
        self._positions = [0] * self.n_layers

    def _prepare(self, layer_idx: Any, k: Any, v: Any) -> tuple[int, Any, int, Any, Any]:
        """Validate one append; return ``(layer_idx, rows, end, k, v)``.

        ``rows`` indexes the rows to write (an int for a ``(d_model,)`` row, a slice
        for ``(n, d_model)``), ``end`` is the layer's length after the write, and
        ``k``, ``v`` are cast to the input dtype. Raises (see ``kvcache_xp.errors``)
        before anything is written.
        """
        if type(layer_idx) is not int or not 0 <= layer_idx < self.n_layers:
            layer_idx = self._check_layer(layer_idx)
        if type(k) is not self._array_type or type(v) is not self._array_type:
            self._check_array_types(k, v)
        if not self._single_device and (k.device != self.device or v.device != self.device):
            self._raise_device(k, v)
        shape = k.shape
        if shape != v.shape:
            self._raise_shape(k, v)
        pos = self._positions[layer_idx]
        if shape == self._row_shape:  # decode: one (d_model,) row
            rows, end = pos, pos + 1  # an integer index writes the row itself
        elif len(shape) == 2 and shape[1] == self.d_model:  # prefill: (n, d_model)
            rows, end = slice(pos, pos + shape[0]), pos + shape[0]
        else:
            self._raise_shape(k, v)
        if end > self.max_seq_len:
            self._raise_overflow(layer_idx, pos, end)
        if k.dtype is not self._input_dtype:
            k = self._cast(k, "k")
        if v.dtype is not self._input_dtype:
            v = self._cast(v, "v")
        return layer_idx, rows, end, k, v

    # -- state --------------------------------------------------------------------

    @property
    def lengths(self) -> tuple[int, ...]:
        """The number of filled rows of each layer."""
        return tuple(self._positions)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The number of filled rows of one layer (the position its next row goes to)."""
        return self._positions[self._check_layer(layer_idx)]

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
        length = as_int(length, LengthError, f"rollback length must be an int, got {length!r}")
        longest = max(self._positions)
        if not 0 <= length <= longest:
            raise LengthError(
                f"cannot roll back to length {length}: it must be in [0, {longest}], "
                f"the longest layer's length (lengths are {self.lengths})"
            )
        self._positions = [min(position, length) for position in self._positions]

    # -- error paths (off the hot path) ---------------------------------------------

    def _check_layer(self, layer_idx: Any) -> int:
        index = as_int(layer_idx, LayerIndexError, f"layer_idx must be an int, got {layer_idx!r}")
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
        if x.dtype == self._input_dtype:  # an equal dtype object, not the same one
            return x
        if x.dtype not in self._castable_dtypes:
            raise DtypeError(
                f"{name} has dtype {x.dtype}; the cache takes real floating input "
                f"(cast on write to {self._input_dtype})"
            )
        return self.xp.astype(x, self._input_dtype)
