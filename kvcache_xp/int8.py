"""INT8 KV cache: int8 rows with one float32 scale per group of ``group_size`` elements.

Storage, allocated once like ``KVCache``'s:

    q_keys, q_values        (n_layers, max_seq_len, d_model)             int8
    key_scales, value_scales (n_layers, max_seq_len, d_model // group_size) float32

Quantization is symmetric, per row and per group (a group is ``group_size``
consecutive elements of a row; with ``group_size = head_dim`` that is one scale per
token per head)::

    scale = max(|x_group|) / 127          q = round(x / scale)  in [-127, 127]
    x  ~  q * scale                       |x - q * scale| <= scale / 2

Every element is in range by construction, so nothing saturates: the element of
largest magnitude maps to +-127 exactly. The clip to [-127, 127] only absorbs
float rounding of ``x / scale`` (at most one unit in the last place); -128 is never
used, keeping the code symmetric. An outlier costs precision to the other elements
of its own group only (the step ``scale`` grows with it), which is why groups are
small. An all-zero group has scale 0 and dequantizes to exact zeros: no division by
zero happens (zero scales divide by 1 instead). A group whose largest magnitude is
below ``SUBNORMAL_SCALE_LIMIT`` (127 times the smallest normal float32, about
1.5e-36) gets a subnormal or zero scale: the half-scale bound no longer holds for
it, but it is reproduced to within that limit (absolutely). Non-finite input (inf, nan) is not
representable and is not checked on the hot path (a check would need a device
synchronization per append): its group dequantizes to nan.

Bytes per element: ``1 + 4 / group_size``; against float32 that is
``0.25 + 1 / group_size`` (0.266 at group 64, 0.281 at group 32).

Attention reads this cache in one of two ways:

- ``append`` (the ``KVCache`` contract) returns dequantized **copies** of the
  layer's rows in ``compute_dtype``: any attention can use them, at the price of a
  cast and a multiply over the whole history every call.
- ``append_quantized`` returns **views** of the int8 rows and their scales, for an
  attention that folds the scales into its scores and probabilities instead
  (``engine.model`` does); that skips the multiply over the history.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._base import LayeredCache, positive_int
from .backends import floating_dtype, get_namespace

__all__ = ["SUBNORMAL_SCALE_LIMIT", "Int8KVCache", "dequantize", "quantize"]

QMAX = 127.0
#: Groups of smaller largest magnitude have subnormal (or zero) float32 scales.
SUBNORMAL_SCALE_LIMIT = QMAX * float(np.finfo(np.float32).tiny)


def quantize(xp: Any, x: Any, group_size: int) -> tuple[Any, Any]:
    """Symmetric int8 quantization of rows in groups.

    x: (n, d) float32, d divisible by group_size -> (q (n, d) int8, scales (n, d // group_size)
    float32). See the module docstring for the rounding and clipping rules.
    """
    n, width = x.shape
    groups = xp.reshape(x, (n, width // group_size, group_size))  # (n, G, g)
    scales = xp.max(xp.abs(groups), axis=-1) / QMAX  # (n, G)
    divisor = xp.where(scales > 0, scales, xp.ones_like(scales))  # zero groups: divide by 1
    q = xp.round(groups / xp.reshape(divisor, (n, width // group_size, 1)))
    q = xp.clip(q, -QMAX, QMAX)  # only float rounding of x / scale can step past 127
    return xp.astype(xp.reshape(q, (n, width)), xp.int8), scales


def dequantize(xp: Any, q: Any, scales: Any, dtype: Any) -> Any:
    """q (n, d) int8, scales (n, G) float32 -> (n, d) in ``dtype``: q * scale per group."""
    n, width = q.shape
    n_groups = scales.shape[-1]
    groups = xp.reshape(xp.astype(q, scales.dtype), (n, n_groups, width // n_groups))
    x = xp.reshape(groups * xp.reshape(scales, (n, n_groups, 1)), (n, width))
    return x if x.dtype == dtype else xp.astype(x, dtype)


class Int8KVCache(LayeredCache):
    """Preallocated int8 KV cache with per-row, per-group float32 scales.

    Parameters
    ----------
    n_layers, d_model, max_seq_len : int
        As for ``KVCache``.
    xp, device : optional
        As for ``KVCache``; ``xp=None`` infers the namespace from ``compute_dtype``.
    compute_dtype : dtype or str, default ``numpy.float32``
        The dtype ``append`` returns (dequantized). Input of any real floating
        dtype is accepted and quantized from float32.
    group_size : int, optional
        Elements per scale; must divide ``d_model``. Pass the attention's
        ``head_dim`` (or a divisor of it) for at least one scale per token per
        head. Default ``gcd(d_model, 64)``: 64 (a common head_dim) where it divides.

    ``append`` follows the ``KVCache`` contract (shapes, errors, nothing changed
    on error) and returns dequantized copies; ``append_quantized`` returns views.
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        max_seq_len: int,
        *,
        xp: Any = None,
        device: Any = None,
        compute_dtype: Any = np.float32,
        group_size: int | None = None,
    ) -> None:
        self.n_layers = positive_int("n_layers", n_layers)
        self.d_model = positive_int("d_model", d_model)
        self.max_seq_len = positive_int("max_seq_len", max_seq_len)
        if group_size is None:
            group_size = math.gcd(self.d_model, 64)
        self.group_size = positive_int("group_size", group_size)
        if self.d_model % self.group_size:
            raise ValueError(f"group_size {self.group_size} must divide d_model {self.d_model}")
        self.n_groups = self.d_model // self.group_size
        xp = get_namespace(xp, compute_dtype)
        self.compute_dtype = xp.empty(
            (0,), dtype=floating_dtype(xp, compute_dtype), device=device
        ).dtype
        rows = (self.n_layers, self.max_seq_len, self.d_model)
        scales = (self.n_layers, self.max_seq_len, self.n_groups)
        self._q_keys = xp.zeros(rows, dtype=xp.int8, device=device)
        self._q_values = xp.zeros(rows, dtype=xp.int8, device=device)
        self._key_scales = xp.zeros(scales, dtype=xp.float32, device=device)
        self._value_scales = xp.zeros(scales, dtype=xp.float32, device=device)
        self.dtype = self._q_keys.dtype
        self._init_layers(xp, self._q_keys, xp.float32)  # input is quantized from float32

    def _write(self, layer_idx: int, rows: Any, end: int, k: Any, v: Any) -> None:
        xp = self.xp
        if k.ndim == 1:  # one decode row: quantize it as a (1, d) batch
            k, v = xp.reshape(k, (1, self.d_model)), xp.reshape(v, (1, self.d_model))
            rows = slice(rows, end)
        q_k, s_k = quantize(xp, k, self.group_size)
        q_v, s_v = quantize(xp, v, self.group_size)
        self._q_keys[layer_idx, rows, :] = q_k
        self._q_values[layer_idx, rows, :] = q_v
        self._key_scales[layer_idx, rows, :] = s_k
        self._value_scales[layer_idx, rows, :] = s_v
        self._positions[layer_idx] = end

    def append(self, layer_idx: int, k: Any, v: Any) -> tuple[Any, Any]:
        """Quantize and write ``k``, ``v``; return the layer's rows dequantized.

        Same arguments, checks and errors as ``KVCache.append``. Returns copies
        ``(pos + n, d_model)`` in ``compute_dtype``.
        """
        layer_idx, rows, end, k, v = self._prepare(layer_idx, k, v)
        self._write(layer_idx, rows, end, k, v)
        return self.view(layer_idx)

    def append_quantized(self, layer_idx: int, k: Any, v: Any) -> tuple[Any, Any, Any, Any]:
        """Quantize and write ``k``, ``v``; return views of the stored layer.

        Returns ``(q_keys (S, d) int8, key_scales (S, G) float32, q_values,
        value_scales)`` for ``S = pos + n``: views of the buffers, no copy.
        """
        layer_idx, rows, end, k, v = self._prepare(layer_idx, k, v)
        self._write(layer_idx, rows, end, k, v)
        return self.quantized_view(layer_idx)

    def quantized_view(self, layer_idx: int) -> tuple[Any, Any, Any, Any]:
        """Views of a layer's filled int8 rows and scales (see ``append_quantized``)."""
        layer_idx = self._check_layer(layer_idx)
        end = self._positions[layer_idx]
        return (
            self._q_keys[layer_idx, :end, :],
            self._key_scales[layer_idx, :end, :],
            self._q_values[layer_idx, :end, :],
            self._value_scales[layer_idx, :end, :],
        )

    def view(self, layer_idx: int) -> tuple[Any, Any]:
        """The layer's filled rows, dequantized: copies in ``compute_dtype``."""
        q_k, s_k, q_v, s_v = self.quantized_view(layer_idx)
        xp = self.xp
        return (
            dequantize(xp, q_k, s_k, self.compute_dtype),
            dequantize(xp, q_v, s_v, self.compute_dtype),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held: the int8 rows and the float32 scales of K and V."""
        return 2 * self.n_layers * self.max_seq_len * (self.d_model + 4 * self.n_groups)

    def __repr__(self) -> str:
        return (
            f"Int8KVCache(n_layers={self.n_layers}, d_model={self.d_model}, "
            f"max_seq_len={self.max_seq_len}, group_size={self.group_size}, "
            f"compute_dtype={self.compute_dtype}, xp={self.xp.__name__}, "
            f"device={self.device}, lengths={self.lengths})"
        )
