"""Paged KV cache: fixed-size blocks from one preallocated pool, a block table per sequence.

The design of vLLM's PagedAttention (Kwon et al., SOSP 2023) and its v1 block pool:

    pool (per layer, K and V)   (num_blocks, block_size, d_model), allocated once
    BlockAllocator              a free list and a reference count per block, O(1)
    PagedSequence               one sequence: its block table and per-layer lengths

Row ``p`` of a sequence lives at ``pool[layer, block_table[p // block_size],
p % block_size]``. Blocks are taken on demand, as appends cross block boundaries,
so a sequence wastes at most the unfilled tail of its last block; a finished
sequence's ``free`` returns its blocks to the pool at once. One block id stands for
the same slot in every layer's pool, so one block table serves all layers. Reference
counts let blocks be shared (``PagedSequence.fork``): a shared block is never
written, an append into a shared, partly filled last block copies it first.

``PagedSequence.append`` has ``KVCache.append``'s contract (shapes, checks, errors,
nothing changed on error) except that the rows are not contiguous in memory: it
returns a **gathered copy** of the sequence's rows (one ``take`` of its blocks per
call). Gathering was chosen by measurement over reading the blocks in place with a
blockwise (online-softmax) attention: see ``benchmarks/bench_paged.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._base import LayeredCache, positive_int
from .backends import floating_dtype, get_namespace
from .errors import CacheOverflowError, OutOfBlocksError, SequenceError

__all__ = ["BlockAllocator", "PagedKVCache", "PagedSequence"]


class BlockAllocator:
    """A free list and a reference count per block; every operation is O(1).

    ``allocate`` hands out blocks with a count of 1, ``incref`` shares one,
    ``release`` drops a reference and returns the block to the free list when the
    count reaches 0. Invariant: ``num_free + num_used == num_blocks``.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = positive_int("num_blocks", num_blocks)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self._refs = [0] * self.num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, count: int = 1) -> list[int]:
        """``count`` free blocks, each with one reference; all or none.

        Raises ``OutOfBlocksError`` (allocating nothing) if fewer are free.
        """
        if count > len(self._free):
            raise OutOfBlocksError(
                f"need {count} free blocks, the pool has {len(self._free)} of {self.num_blocks}"
            )
        blocks = [self._free.pop() for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def incref(self, block: int) -> None:
        if self._refs[block] == 0:
            raise SequenceError(f"block {block} is free: it cannot be shared")
        self._refs[block] += 1

    def release(self, block: int) -> None:
        """Drop one reference; a block nobody references goes back to the free list."""
        if self._refs[block] == 0:
            raise SequenceError(f"block {block} is already free (double release)")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)


class PagedKVCache(LayeredCache):
    """The block pool shared by many sequences.

    Parameters
    ----------
    n_layers, d_model : int
        As for ``KVCache``.
    num_blocks : int
        Blocks in the pool; each holds ``block_size`` rows of every layer's K and V.
    block_size : int, default 16
    dtype, xp, device
        As for ``KVCache``.
    max_seq_len : int, optional
        The longest a single sequence may grow (``CacheOverflowError`` past it);
        default ``num_blocks * block_size``.
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: Any = np.float32,
        *,
        xp: Any = None,
        device: Any = None,
        max_seq_len: int | None = None,
    ) -> None:
        self.n_layers = positive_int("n_layers", n_layers)
        self.d_model = positive_int("d_model", d_model)
        self.block_size = positive_int("block_size", block_size)
        self.allocator = BlockAllocator(num_blocks)
        self.num_blocks = self.allocator.num_blocks
        self.max_seq_len = positive_int(
            "max_seq_len", self.num_blocks * self.block_size if max_seq_len is None else max_seq_len
        )
        xp = get_namespace(xp, dtype)
        shape = (self.n_layers, self.num_blocks, self.block_size, self.d_model)
        self._keys = xp.zeros(shape, dtype=floating_dtype(xp, dtype), device=device)
        self._values = xp.zeros(shape, dtype=self._keys.dtype, device=device)
        self.dtype = self._keys.dtype
        self._itemsize = xp.finfo(self.dtype).bits // 8
        self._init_layers(xp, self._keys, self.dtype)
        self._sequences: dict[int, PagedSequence] = {}
        self._next_id = 0

    # -- sequences ----------------------------------------------------------------

    def add_sequence(self) -> PagedSequence:
        """A new, empty sequence. It holds no block until its first append."""
        sequence = PagedSequence(self, self._next_id)
        self._sequences[self._next_id] = sequence
        self._next_id += 1
        return sequence

    def free(self, sequence: PagedSequence) -> None:
        """Return the sequence's blocks to the pool; the handle is dead afterwards.

        Raises ``SequenceError`` for a sequence freed already or of another cache.
        """
        self._check_sequence(sequence)
        for block in sequence.block_table:
            self.allocator.release(block)
        del self._sequences[sequence.sequence_id]
        sequence._block_table = None

    def _check_sequence(self, sequence: PagedSequence) -> None:
        if self._sequences.get(getattr(sequence, "sequence_id", None)) is not sequence:
            state = "was freed" if getattr(sequence, "_cache", None) is self else "is unknown"
            raise SequenceError(f"sequence {sequence!r} {state} in this cache")

    @property
    def sequences(self) -> list[PagedSequence]:
        """The live sequences, oldest first."""
        return list(self._sequences.values())

    # -- accounting -----------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used

    def blocks_for(self, rows: int) -> int:
        """Blocks that ``rows`` rows of one sequence occupy."""
        return -(-rows // self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V pools (allocated, whether used or not)."""
        return 2 * self.n_layers * self.num_blocks * self.block_size * self.d_model * self._itemsize

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.n_layers * self.block_size * self.d_model * self._itemsize

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(n_layers={self.n_layers}, d_model={self.d_model}, "
            f"num_blocks={self.num_blocks}, block_size={self.block_size}, dtype={self.dtype}, "
            f"xp={self.xp.__name__}, free={self.num_free_blocks}, "
            f"sequences={len(self._sequences)})"
        )


class PagedSequence(LayeredCache):
    """One sequence in a ``PagedKVCache``: a block table and per-layer lengths.

    Made by ``PagedKVCache.add_sequence``. It fits the model's cache protocol
    (``append``, ``get_seq_length``), so ``Model.prefill``/``decode_step``/
    ``generate`` run on it unchanged.
    """

    def __init__(self, cache: PagedKVCache, sequence_id: int) -> None:
        self._cache = cache
        self.sequence_id = sequence_id
        self.n_layers, self.d_model = cache.n_layers, cache.d_model
        self.max_seq_len, self.block_size = cache.max_seq_len, cache.block_size
        self._init_layers_like(cache)
        self._block_table: list[int] | None = []
        self._block_ids = None  # the block table as an index array on the device

    @property
    def block_table(self) -> list[int]:
        """The pool blocks holding this sequence's rows, in order (a copy)."""
        return list(self._live_table())

    def _live_table(self) -> list[int]:
        if self._block_table is None:
            raise SequenceError(f"sequence {self.sequence_id} was freed")
        return self._block_table

    # -- growing ----------------------------------------------------------------------

    def reserve(self, rows: int) -> None:
        """Make sure ``rows`` more rows fit in every layer, taking blocks if needed.

        After it, appending up to ``rows`` rows to each layer cannot run out of
        blocks. Raises ``CacheOverflowError`` past ``max_seq_len`` and
        ``OutOfBlocksError`` when the pool is short; either way nothing changes.
        """
        table = self._live_table()
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"reserve takes a row count >= 0, got {rows!r}")
        end = max(self._positions) + rows
        if end > self.max_seq_len:
            raise CacheOverflowError(
                f"sequence {self.sequence_id} holds {max(self._positions)} rows; {rows} more "
                f"would pass max_seq_len={self.max_seq_len}"
            )
        self._grow(table, min(self._positions), end)

    def _must_copy(self, table: list[int], pos: int, end: int) -> bool:
        """Whether writing rows [pos, end) starts in a block shared with a fork."""
        first = pos // self.block_size
        return (
            end > pos and first < len(table) and self._cache.allocator.ref_count(table[first]) > 1
        )

    def _grow(self, table: list[int], pos: int, end: int) -> None:
        """Own blocks for rows [0, end), the block row ``pos`` is in privately.

        All or nothing: the blocks are allocated in one call before anything changes.
        A block shared with a fork is copied (all layers) before it is written.
        """
        cache = self._cache
        missing = max(cache.blocks_for(end) - len(table), 0)
        copy = self._must_copy(table, pos, end)
        if not missing and not copy:
            return
        blocks = cache.allocator.allocate(missing + copy)  # OutOfBlocksError: nothing changed
        if copy:  # copy-on-write
            first = pos // self.block_size
            private, shared = blocks.pop(), table[first]
            cache._keys[:, private, :, :] = cache._keys[:, shared, :, :]
            cache._values[:, private, :, :] = cache._values[:, shared, :, :]
            cache.allocator.release(shared)
            table[first] = private
        table.extend(blocks)
        self._block_ids = self.xp.asarray(table, dtype=self.xp.int64, device=self.device)

    def append(self, layer_idx: int, k: Any, v: Any) -> tuple[Any, Any]:
        """``KVCache.append``'s contract, through the block table.

        Takes new blocks as rows cross block boundaries (``OutOfBlocksError``, and
        nothing changed, when the pool is short). Returns ``(K, V)``: gathered
        copies ``(pos + n, d_model)`` of the layer's rows, in order.
        """
        table = self._live_table()
        layer_idx, rows, end, k, v = self._prepare(layer_idx, k, v)
        pos = self._positions[layer_idx]
        if end > len(table) * self.block_size or self._must_copy(table, pos, end):
            self._grow(table, pos, end)
        keys, values, size = self._cache._keys, self._cache._values, self.block_size
        if isinstance(rows, int):  # one decode row
            block, offset = table[pos // size], pos % size
            keys[layer_idx, block, offset, :] = k
            values[layer_idx, block, offset, :] = v
        else:  # a prefill: one slice write per block it touches
            start = pos
            while start < end:
                block, offset = table[start // size], start % size
                stop = min(end, start - offset + size)
                span, part = slice(offset, offset + stop - start), slice(start - pos, stop - pos)
                keys[layer_idx, block, span, :] = k[part, :]
                values[layer_idx, block, span, :] = v[part, :]
                start = stop
        self._positions[layer_idx] = end
        return self._gather(layer_idx, end)

    # -- reading ------------------------------------------------------------------------

    def _gather(self, layer_idx: int, end: int) -> tuple[Any, Any]:
        xp, cache = self.xp, self._cache
        if end == 0:
            empty = cache._keys[layer_idx, 0, :0, :]
            return empty, cache._values[layer_idx, 0, :0, :]
        n_blocks = -(-end // self.block_size)
        ids = self._block_ids[:n_blocks]
        rows = n_blocks * self.block_size
        keys = xp.reshape(xp.take(cache._keys[layer_idx, ...], ids, axis=0), (rows, self.d_model))
        values = xp.reshape(
            xp.take(cache._values[layer_idx, ...], ids, axis=0), (rows, self.d_model)
        )
        return keys[:end, :], values[:end, :]

    def view(self, layer_idx: int) -> tuple[Any, Any]:
        """Gathered copies ``(K, V)`` of the layer's filled rows, without appending."""
        self._live_table()
        layer_idx = self._check_layer(layer_idx)
        return self._gather(layer_idx, self._positions[layer_idx])

    # -- lifetime -------------------------------------------------------------------------

    def fork(self) -> PagedSequence:
        """A new sequence with this one's rows, sharing its blocks (reference counts).

        Neither writes a shared block: the first append into a shared, partly
        filled last block copies it into a private one (copy-on-write).
        """
        table = self._live_table()
        if len(set(self._positions)) != 1:
            raise SequenceError(
                f"fork needs every layer at the same length; lengths are {self.lengths}"
            )
        child = self._cache.add_sequence()
        for block in table:
            self._cache.allocator.incref(block)
        child._block_table = list(table)
        child._block_ids = self._block_ids
        child._positions = list(self._positions)
        return child

    def free(self) -> None:
        """Return this sequence's blocks to the pool (``PagedKVCache.free``)."""
        self._cache.free(self)

    def reset(self) -> None:
        """Empty the sequence and return its blocks; the handle stays usable."""
        table = self._live_table()
        for block in table:
            self._cache.allocator.release(block)
        table.clear()
        self._block_ids = None
        self._positions = [0] * self.n_layers

    def rollback(self, length: int) -> None:
        """``KVCache.rollback``; blocks no layer needs any more go back to the pool."""
        table = self._live_table()
        super().rollback(length)
        keep = self._cache.blocks_for(max(self._positions))
        for block in table[keep:]:
            self._cache.allocator.release(block)
        del table[keep:]
        self._block_ids = self._block_ids[:keep] if keep else None

    @property
    def num_blocks(self) -> int:
        return len(self._live_table())

    @property
    def nbytes(self) -> int:
        """Bytes of the pool blocks this sequence references (shared ones included)."""
        return self.num_blocks * self._cache.bytes_per_block

    def __repr__(self) -> str:
        state = "freed" if self._block_table is None else f"blocks={self._block_table}"
        return f"PagedSequence(id={self.sequence_id}, lengths={self.lengths}, {state})"
