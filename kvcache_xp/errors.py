"""Exceptions raised by kvcache_xp.

Every error a cache raises on bad input derives from :class:`KVCacheError`, and
each also derives from the built-in exception a Python user would reach for
first (``IndexError`` for a layer out of range, ``ValueError`` for a bad shape,
``TypeError`` for an array of the wrong library), so both ``except KVCacheError``
and ``except ValueError`` work. A cache that raises is left exactly as it was
before the call: nothing written, nothing lost.

=========================  ===============================================
class                      raised when
=========================  ===============================================
``LayerIndexError``        ``layer_idx`` is not an int in ``[0, n_layers)``
``ShapeError``             ``k`` or ``v`` has the wrong rank or width
``KVMismatchError``        ``k`` and ``v`` disagree in shape
``CacheOverflowError``     ``pos + n`` would pass ``max_seq_len``
``NamespaceMismatchError`` an array of another library (or not an array)
``DeviceMismatchError``    an array on another device
``DtypeError``             a non-floating input, or a dtype the backend lacks
``LengthError``            ``rollback`` to a length the cache does not hold
``UnsupportedBackendError`` a namespace that cannot hold an in-place cache
``BackendUnavailableError`` a backend that is not installed or has no device
``OutOfBlocksError``       a paged cache's pool has too few free blocks
``SequenceError``          a freed or unknown paged sequence, a double free
=========================  ===============================================
"""

from __future__ import annotations

__all__ = [
    "BackendMismatchError",
    "BackendUnavailableError",
    "CacheOverflowError",
    "DeviceMismatchError",
    "DtypeError",
    "KVCacheError",
    "KVMismatchError",
    "LayerIndexError",
    "LengthError",
    "NamespaceMismatchError",
    "OutOfBlocksError",
    "SequenceError",
    "ShapeError",
    "UnsupportedBackendError",
]


class KVCacheError(Exception):
    """Base class of every error raised by kvcache_xp."""


class LayerIndexError(KVCacheError, IndexError):
    """``layer_idx`` is not an integer in ``[0, n_layers)``."""


class ShapeError(KVCacheError, ValueError):
    """``k`` or ``v`` is neither ``(n, width)`` nor ``(width,)`` for the cache's width."""


class KVMismatchError(ShapeError):
    """``k`` and ``v`` are each well formed but disagree with each other."""


class CacheOverflowError(KVCacheError, ValueError):
    """The append would write past ``max_seq_len`` rows of the layer."""


class BackendMismatchError(KVCacheError, TypeError):
    """Base of the errors for an input array that the cache's backend cannot take."""


class NamespaceMismatchError(BackendMismatchError):
    """The input is not an array of the cache's array namespace (another library, a list...)."""


class DeviceMismatchError(BackendMismatchError):
    """The input array lives on another device than the cache's buffers."""


class DtypeError(KVCacheError, TypeError):
    """A non-floating input array, or a cache dtype that the backend does not have."""


class LengthError(KVCacheError, ValueError):
    """A rollback to a negative length, or to more rows than a layer holds."""


class UnsupportedBackendError(KVCacheError, TypeError):
    """A namespace that cannot hold a preallocated, in-place cache (JAX: immutable arrays)."""


class BackendUnavailableError(KVCacheError, RuntimeError):
    """A backend that is not installed here, or whose device (a GPU) is missing."""


class OutOfBlocksError(KVCacheError, MemoryError):
    """A paged cache's block pool cannot supply the blocks an append or reservation needs.

    Raised before anything is written or allocated: the sequence is untouched.
    """


class SequenceError(KVCacheError, LookupError):
    """A paged sequence that was freed, that belongs to another cache, or a block freed twice."""
