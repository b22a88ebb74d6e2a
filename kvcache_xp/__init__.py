"""kvcache_xp: KV caches for LLM decoding, written once against the Python array API.

The same code runs on NumPy, CuPy, PyTorch and array-api-strict::

    import numpy as np
    from kvcache_xp import KVCache

    cache = KVCache(n_layers=2, d_model=64, max_seq_len=128, dtype=np.float16)
    K, V = cache.append(0, np.ones((5, 64)), np.ones((5, 64)))   # prefill: 5 rows
    K, V = cache.append(0, np.ones(64), np.ones(64))             # decode: one row
    K.shape, K.dtype                                             # (6, 64), float16
"""

from .backends import BACKEND_NAMES, Backend, get_namespace, load_backend, to_numpy
from .cache import KVCache
from .errors import (
    BackendMismatchError,
    BackendUnavailableError,
    CacheOverflowError,
    DeviceMismatchError,
    DtypeError,
    KVCacheError,
    KVMismatchError,
    LayerIndexError,
    LengthError,
    NamespaceMismatchError,
    OutOfBlocksError,
    SequenceError,
    ShapeError,
    UnsupportedBackendError,
)
from .int8 import Int8KVCache
from .paged import BlockAllocator, PagedKVCache, PagedSequence

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendMismatchError",
    "BackendUnavailableError",
    "BlockAllocator",
    "CacheOverflowError",
    "DeviceMismatchError",
    "DtypeError",
    "Int8KVCache",
    "KVCache",
    "KVCacheError",
    "KVMismatchError",
    "LayerIndexError",
    "LengthError",
    "NamespaceMismatchError",
    "OutOfBlocksError",
    "PagedKVCache",
    "PagedSequence",
    "SequenceError",
    "ShapeError",
    "UnsupportedBackendError",
    "get_namespace",
    "load_backend",
    "to_numpy",
]
