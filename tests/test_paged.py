"""kvcache_xp.paged: the block pool, the allocator, per-sequence block tables.

Oracles: the contiguous ``KVCache`` fed the same rows, and (in the state machine)
plain Python lists of rows per sequence and a reference count recomputed from the
live block tables.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BAD_APPENDS, check_bad_append, host, rows, snapshot

from kvcache_xp import (
    BlockAllocator,
    CacheOverflowError,
    DtypeError,
    KVCache,
    OutOfBlocksError,
    PagedKVCache,
    SequenceError,
)

N_LAYERS, WIDTH = 2, 8


def make_pool(xp, device, num_blocks=16, block_size=4, **kwargs):
    return PagedKVCache(N_LAYERS, WIDTH, num_blocks, block_size, xp=xp, device=device, **kwargs)


@pytest.mark.parametrize("block_size", [1, 16, 5])
def test_paged_append_reproduces_the_contiguous_cache_across_blocks(xp, device, block_size):
    rng = np.random.default_rng(0)
    pool = make_pool(xp, device, num_blocks=64, block_size=block_size)
    sequence = pool.add_sequence()
    reference = KVCache(N_LAYERS, WIDTH, 64, xp=xp, device=device)
    steps = [(13, WIDTH)] + [(WIDTH,)] * 20 + [(7, WIDTH), (0, WIDTH), (WIDTH,)]
    for shape in steps:
        for layer in range(N_LAYERS):
            k, v = rows(xp, device, rng, *shape), rows(xp, device, rng, *shape)
            got = sequence.append(layer, k, v)
            want = reference.append(layer, k, v)
            for g, w in zip(got, want, strict=True):
                assert tuple(g.shape) == tuple(w.shape)
                np.testing.assert_array_equal(host(g), host(w))
    assert sequence.lengths == reference.lengths == (41, 41)
    assert sequence.num_blocks == -(-41 // block_size)
    assert pool.num_used_blocks == sequence.num_blocks


def test_sequences_interleave_without_touching_each_other(xp, device):
    rng = np.random.default_rng(1)
    pool = make_pool(xp, device)
    a, b = pool.add_sequence(), pool.add_sequence()
    ref_a = KVCache(N_LAYERS, WIDTH, 64, xp=xp, device=device)
    ref_b = KVCache(N_LAYERS, WIDTH, 64, xp=xp, device=device)
    for step in range(12):
        for sequence, reference in ((a, ref_a), (b, ref_b)) if step % 3 else ((b, ref_b),):
            k = rows(xp, device, rng, WIDTH)
            sequence.append(0, k, k)
            reference.append(0, k, k)
    assert set(a.block_table).isdisjoint(b.block_table)
    for sequence, reference in ((a, ref_a), (b, ref_b)):
        np.testing.assert_array_equal(host(sequence.view(0)[0]), host(reference.view(0)[0]))


def test_out_of_blocks_raises_and_leaves_the_sequence_untouched(xp, device):
    rng = np.random.default_rng(2)
    pool = make_pool(xp, device, num_blocks=4, block_size=4)
    block = rows(xp, device, rng, 10, WIDTH)
    pool.add_sequence().append(0, block[0, :], block[0, :])  # another sequence holds a block
    sequence = pool.add_sequence()
    sequence.append(0, block, block)  # 3 more blocks: the pool is full
    other = pool.add_sequence()
    before, table = snapshot(sequence), sequence.block_table
    with pytest.raises(OutOfBlocksError, match="need 1 free blocks, the pool has 0 of 4"):
        other.append(0, block[:1, :], block[:1, :])
    assert other.lengths == (0, 0) and other.block_table == []
    sequence.append(0, block[:2, :], block[:2, :])  # rows 10, 11 still fit in block 3
    with pytest.raises(OutOfBlocksError):  # row 12 needs a fourth block
        sequence.append(0, block[0, :], block[0, :])
    with pytest.raises(OutOfBlocksError):  # and so does a reservation
        sequence.reserve(1)
    assert sequence.block_table == table and sequence.lengths == (12, 0)
    np.testing.assert_array_equal(host(sequence.view(0)[0])[:10], before[1][0])
    assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks


@pytest.mark.parametrize("case", BAD_APPENDS)
def test_bad_append_raises_specific_error_and_changes_nothing(xp, device, case):
    pool = make_pool(xp, device, max_seq_len=16)
    sequence = pool.add_sequence()
    check_bad_append(sequence, sequence.append, xp, device, case, 16)
    assert pool.num_used_blocks == sequence.num_blocks == pool.blocks_for(3)


def test_freeing_returns_blocks_and_kills_the_handle(xp, device):
    pool = make_pool(xp, device)
    sequence = pool.add_sequence()
    block = xp.ones((9, WIDTH), dtype=xp.float32, device=device)
    sequence.append(0, block, block)
    assert pool.num_used_blocks == 3
    sequence.free()
    assert pool.num_free_blocks == pool.num_blocks and pool.sequences == []
    with pytest.raises(SequenceError, match="was freed"):
        sequence.append(0, block, block)
    with pytest.raises(SequenceError, match="was freed"):
        sequence.free()
    with pytest.raises(SequenceError, match="was freed"):
        sequence.view(0)
    stranger = make_pool(xp, device).add_sequence()
    with pytest.raises(SequenceError, match="is unknown"):
        pool.free(stranger)


def test_reserve_then_append_allocates_nothing_more(xp, device):
    pool = make_pool(xp, device, num_blocks=8, block_size=4)
    sequence = pool.add_sequence()
    sequence.reserve(6)
    assert sequence.num_blocks == 2
    row = xp.ones((WIDTH,), dtype=xp.float32, device=device)
    for _ in range(6):
        for layer in range(N_LAYERS):
            sequence.append(layer, row, row)
    assert sequence.num_blocks == 2 and pool.num_used_blocks == 2
    with pytest.raises(CacheOverflowError, match="max_seq_len=32"):
        sequence.reserve(27)
    assert sequence.num_blocks == 2


def test_rollback_returns_blocks_no_layer_needs(xp, device):
    rng = np.random.default_rng(4)
    pool = make_pool(xp, device, block_size=4)
    sequence = pool.add_sequence()
    block = rows(xp, device, rng, 10, WIDTH)
    for layer in range(N_LAYERS):
        sequence.append(layer, block, block)
    sequence.rollback(5)
    assert sequence.num_blocks == 2 and pool.num_used_blocks == 2
    np.testing.assert_array_equal(host(sequence.view(1)[0]), host(block)[:5])
    sequence.reset()
    assert pool.num_used_blocks == 0 and sequence.lengths == (0, 0)


def test_fork_shares_blocks_and_copies_the_shared_tail_on_write(xp, device):
    rng = np.random.default_rng(5)
    pool = make_pool(xp, device, block_size=4)
    parent = pool.add_sequence()
    prefix = rows(xp, device, rng, 6, WIDTH)  # one full block, one half-full
    for layer in range(N_LAYERS):
        parent.append(layer, prefix, prefix)
    child = parent.fork()
    assert child.block_table == parent.block_table
    assert [pool.allocator.ref_count(b) for b in parent.block_table] == [2, 2]
    a, b = rows(xp, device, rng, 3, WIDTH), rows(xp, device, rng, 2, WIDTH)
    for layer in range(N_LAYERS):
        parent.append(layer, a, a)
        child.append(layer, b, b)
    assert parent.block_table[0] == child.block_table[0]  # the full block stays shared
    assert parent.block_table[1] != child.block_table[1]  # the tail was copied on write
    want_parent = np.concatenate([host(prefix), host(a)])
    want_child = np.concatenate([host(prefix), host(b)])
    for layer in range(N_LAYERS):
        np.testing.assert_array_equal(host(parent.view(layer)[0]), want_parent)
        np.testing.assert_array_equal(host(child.view(layer)[1]), want_child)
    parent.free()
    assert pool.allocator.ref_count(child.block_table[0]) == 1
    child.free()
    assert pool.num_free_blocks == pool.num_blocks


def test_fork_needs_equal_layer_lengths(xp, device):
    pool = make_pool(xp, device)
    sequence = pool.add_sequence()
    row = xp.ones((WIDTH,), dtype=xp.float32, device=device)
    sequence.append(0, row, row)  # mid-step: layer 1 is behind
    with pytest.raises(SequenceError, match="same length"):
        sequence.fork()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_blocks": 0}, ValueError, "num_blocks must be a positive int"),
        ({"block_size": -4}, ValueError, "block_size must be a positive int"),
        ({"dtype": "int32"}, DtypeError, "real floating dtype"),
        ({"max_seq_len": 2.5}, TypeError, "max_seq_len must be a positive int"),
    ],
)
def test_bad_pool_arguments_are_refused(kwargs, error, message):
    arguments = {"num_blocks": 4, "block_size": 4} | kwargs
    with pytest.raises(error, match=message):
        PagedKVCache(1, 8, **arguments)


@pytest.mark.parametrize("rows_asked", [-1, 1.5, True])
def test_bad_reservation_is_refused(xp, device, rows_asked):
    pool = make_pool(xp, device)
    sequence = pool.add_sequence()
    with pytest.raises(ValueError, match="row count >= 0"):
        sequence.reserve(rows_asked)
    assert pool.num_used_blocks == 0


def test_pool_bytes_and_shapes(xp, device):
    pool = make_pool(xp, device, num_blocks=10, block_size=4)
    assert pool.nbytes == 2 * N_LAYERS * 10 * 4 * WIDTH * 4
    assert pool.bytes_per_block * pool.num_blocks == pool.nbytes
    assert pool.blocks_for(0) == 0 and pool.blocks_for(4) == 1 and pool.blocks_for(5) == 2


def test_allocator_refuses_double_release_and_sharing_a_free_block():
    allocator = BlockAllocator(4)
    (block,) = allocator.allocate()
    allocator.release(block)
    with pytest.raises(SequenceError, match="double release"):
        allocator.release(block)
    with pytest.raises(SequenceError, match="cannot be shared"):
        allocator.incref(block)
    with pytest.raises(OutOfBlocksError):
        allocator.allocate(5)
    assert allocator.num_free == 4


# -- property-based: the allocator and sequences against a model --------------------


def test_state_machine_no_leak_no_double_use_no_unreferenced_sharing(xp, device):
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        invariant,
        rule,
        run_state_machine_as_test,
    )

    num_blocks, block_size = 10, 3

    class PoolMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PagedKVCache(1, 2, num_blocks, block_size, xp=xp, device=device)
            self.model: dict[int, list[np.ndarray]] = {}  # sequence id -> rows held
            self.handles: dict[int, object] = {}
            self.counter = 0

        @rule()
        def admit(self):
            sequence = self.pool.add_sequence()
            self.handles[sequence.sequence_id], self.model[sequence.sequence_id] = sequence, []

        @rule(data=st.data(), n=st.integers(0, 7), decode=st.booleans())
        def append(self, data, n, decode):
            if not self.handles:
                return
            sid = data.draw(st.sampled_from(sorted(self.handles)))
            sequence, held = self.handles[sid], self.model[sid]
            self.counter += 1
            count = 1 if decode else n
            new = np.arange(count * 2, dtype=np.float32).reshape(count, 2) + 100 * self.counter
            k = xp.asarray(new[0] if decode else new, device=device)
            private = sum(self.pool.allocator.ref_count(b) == 1 for b in sequence.block_table)
            try:
                sequence.append(0, k, k)
            except OutOfBlocksError:
                assert self.pool.num_free_blocks < num_blocks  # something holds the pool
                assert (
                    sum(self.pool.allocator.ref_count(b) == 1 for b in sequence.block_table)
                    == private
                )
                return
            held.extend(new)

        @rule(data=st.data())
        def fork(self, data):
            if not self.handles:
                return
            parent = self.handles[data.draw(st.sampled_from(sorted(self.handles)))]
            child = parent.fork()
            self.handles[child.sequence_id] = child
            self.model[child.sequence_id] = list(self.model[parent.sequence_id])

        @rule(data=st.data())
        def free(self, data):
            if not self.handles:
                return
            sid = data.draw(st.sampled_from(sorted(self.handles)))
            self.handles.pop(sid).free()
            del self.model[sid]

        @rule(data=st.data(), length=st.integers(0, 20))
        def rollback(self, data, length):
            if not self.handles:
                return
            sid = data.draw(st.sampled_from(sorted(self.handles)))
            if length <= len(self.model[sid]):
                self.handles[sid].rollback(length)
                del self.model[sid][length:]

        @invariant()
        def blocks_are_accounted_for(self):
            allocator = self.pool.allocator
            assert allocator.num_free + allocator.num_used == num_blocks
            references = [0] * num_blocks
            for sequence in self.handles.values():
                table = sequence.block_table
                assert len(set(table)) == len(table)  # no block twice in one table
                assert len(table) == -(-sequence.get_seq_length(0) // block_size)
                for block in table:
                    references[block] += 1
            for block in range(num_blocks):  # no leak, no sharing without a reference
                assert allocator.ref_count(block) == references[block]
            assert allocator.num_used == sum(r > 0 for r in references)

        @invariant()
        def contents_match(self):
            for sid, sequence in self.handles.items():
                keys, values = sequence.view(0)
                want = np.array(self.model[sid], np.float32).reshape(-1, 2)
                np.testing.assert_array_equal(host(keys), want)
                np.testing.assert_array_equal(host(values), want)

    run_state_machine_as_test(
        PoolMachine, settings=settings(max_examples=40, stateful_step_count=30, deadline=None)
    )
