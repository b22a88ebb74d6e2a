"""Continuous batching over a paged KV cache (the scheduling of vLLM and Orca).

Requests wait in a queue. Each step the scheduler

1. admits waiting requests, first come first served, while the pool has the
   blocks their prompt needs (a new request is prefilled alone, which also gives
   its first token);
2. makes sure every running sequence has room for one more row; when the pool is
   short it **preempts by recomputation**: the youngest running request gives its
   blocks back and returns to the head of the queue, keeping the tokens it has
   generated; on readmission its prompt is prefilled again and its generated
   tokens' rows are recomputed: batch-invariant, by feeding them again through the
   batched decode steps (catching up: their outputs are known and dropped; a
   prefill over them would round differently from the decode steps that first
   made them), otherwise by one prefill over prompt and tokens;
3. decodes all running sequences together (``Model.decode_batch``: the matmuls
   batched, attention per sequence over its own blocks);
4. retires the requests that reached their ``max_new_tokens`` or their EOS token,
   returning their blocks to the pool at once.

Decoding is greedy. With ``batch_invariant=True`` (the default) every request's
tokens are those ``Model.generate`` gives it alone, bit for bit on NumPy and
array-api-strict (the tests check this, preemption included); ``False`` batches the
weight matmuls for speed and agrees with solo decoding to float32 rounding.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvcache_xp import PagedKVCache, PagedSequence, to_numpy
from kvcache_xp.errors import OutOfBlocksError

__all__ = ["Request", "Scheduler", "SchedulerStats", "generate_batch"]


@dataclass(eq=False)  # identity, not field-by-field equality: requests are looked up in lists
class Request:
    """One generation request and its progress."""

    prompt: list[int]
    max_new_tokens: int
    eos_token_id: int | None = None  # stop after generating this token (it is kept)
    request_id: int = -1
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # generated tokens whose rows the sequence holds; < len - 1: catching up
    sequence: PagedSequence | None = None
    admitted: int = -1  # admission order: the largest is the youngest running request
    preemptions: int = 0

    @property
    def finished(self) -> bool:
        return len(self.generated) >= self.max_new_tokens or (
            self.eos_token_id is not None
            and bool(self.generated)
            and self.generated[-1] == self.eos_token_id
        )


@dataclass
class SchedulerStats:
    """What a run did: steps, tokens, preemptions, the largest batch, peak blocks."""

    decode_steps: int = 0
    decoded_tokens: int = 0
    prefills: int = 0
    recomputed_tokens: int = 0  # generated tokens whose rows were computed again
    preemptions: int = 0
    max_batch: int = 0
    peak_used_blocks: int = 0
    # sum over decode steps of (rows held, rows the held blocks could hold)
    held_rows: int = 0
    allocated_rows: int = 0


class Scheduler:
    """Continuous batching of greedy requests over one ``PagedKVCache``.

    ``Scheduler(model, num_blocks=..., block_size=16, max_batch_size=None)``; add
    requests with ``add``, then ``run()`` returns each request's new tokens.
    """

    def __init__(
        self,
        model: Any,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_batch_size: int | None = None,
        cache_dtype: Any = "float32",
        batch_invariant: bool = True,
    ) -> None:
        config = model.config
        self.batch_invariant = batch_invariant
        self.model = model
        self.cache = PagedKVCache(
            config.n_layers, config.kv_dim, num_blocks, block_size, cache_dtype,
            xp=model.xp, device=model.device, max_seq_len=config.max_seq_len,
        )  # fmt: skip
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.stats = SchedulerStats()
        self._ids = itertools.count()
        self._admissions = itertools.count()
        self._argmax = model.xp.argmax

    def add(
        self, prompt: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None
    ) -> Request:
        """Queue a request; raises ``ValueError`` if it could never run in this pool."""
        prompt = self.model._check_tokens(prompt, "prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        rows = len(prompt) + max_new_tokens - 1  # the last token is returned, never fed
        self.model._check_room(0, rows)
        if self.cache.blocks_for(rows) > self.cache.num_blocks:
            raise ValueError(
                f"a request of {len(prompt)} prompt + {max_new_tokens} new tokens needs "
                f"{self.cache.blocks_for(rows)} blocks of {self.cache.block_size} rows; "
                f"the pool has {self.cache.num_blocks}"
            )
        request = Request(prompt, max_new_tokens, eos_token_id, next(self._ids))
        self.waiting.append(request)
        return request

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> list[list[int]]:
        """Run until every request is done; return their new tokens in request order."""
        while self.waiting or self.running:
            self.step()
        return [r.generated for r in sorted(self.finished, key=lambda r: r.request_id)]

    def step(self) -> None:
        """Admit, make room, decode one token for every running request, retire."""
        self._admit()
        self._make_room()
        if self.running:
            self._decode()
        self._account()

    def _admit(self) -> None:
        cache = self.cache
        while self.waiting and (
            self.max_batch_size is None or len(self.running) < self.max_batch_size
        ):
            request = self.waiting[0]
            # a resumed request recomputes its prompt and the tokens it had fed; its
            # next decode row must fit too, or admission would preempt at once
            rows = len(request.prompt) + max(len(request.generated) - 1, 0)
            if cache.blocks_for(rows + 1) > cache.num_free_blocks:
                break  # first come, first served: nobody overtakes the head
            self.waiting.popleft()
            request.sequence = cache.add_sequence()
            request.admitted = next(self._admissions)
            lost = request.generated[:-1]  # generated tokens whose rows went with the blocks
            if self.batch_invariant or not lost:
                logits = self.model.prefill(request.prompt, request.sequence)
                request.fed = 0  # any lost rows are recomputed by the decode steps
            else:
                logits = self.model.prefill(request.prompt + lost, request.sequence)
                request.fed = len(lost)
            self.stats.prefills += 1
            self.stats.recomputed_tokens += len(lost)
            if not request.generated:  # a fresh request: the prefill gives its first token
                request.generated.append(int(self._argmax(logits)))
            if request.finished:
                self._retire(request)
            else:
                self.running.append(request)

    def _make_room(self) -> None:
        """Reserve one row for every running sequence, preempting the youngest as needed."""
        for request in sorted(self.running, key=lambda r: r.admitted):
            while request in self.running:
                try:
                    request.sequence.reserve(1)
                    break
                except OutOfBlocksError:
                    self._preempt(max(self.running, key=lambda r: r.admitted))

    def _preempt(self, request: Request) -> None:
        if len(self.running) == 1:  # alone and still short: the pool is too small
            raise OutOfBlocksError(
                f"request {request.request_id} alone needs more than the pool's "
                f"{self.cache.num_blocks} blocks"
            )
        self.running.remove(request)
        request.sequence.free()
        request.sequence = None
        request.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(request)

    def _decode(self) -> None:
        running = self.running
        logits = self.model.decode_batch(
            [r.generated[r.fed] for r in running],
            [r.sequence for r in running],
            batch_invariant=self.batch_invariant,
        )  # (B, vocab)
        tokens = self.model.xp.argmax(logits, axis=-1)
        self.stats.decode_steps += 1
        self.stats.decoded_tokens += len(running)
        self.stats.max_batch = max(self.stats.max_batch, len(running))
        for request, token in zip(running, _to_list(tokens), strict=True):
            request.fed += 1
            if request.fed == len(request.generated):  # caught up: a new token
                request.generated.append(token)
        for request in [r for r in running if r.finished]:
            self._retire(request)

    def _retire(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        request.sequence.free()
        request.sequence = None
        self.finished.append(request)

    def _account(self) -> None:
        stats, cache = self.stats, self.cache
        stats.peak_used_blocks = max(stats.peak_used_blocks, cache.num_used_blocks)
        stats.held_rows += sum(r.sequence.get_seq_length(0) for r in self.running)
        stats.allocated_rows += cache.num_used_blocks * cache.block_size


def _to_list(tokens: Any) -> list[int]:
    """A (B,) integer array of any backend as Python ints (one transfer from a GPU)."""
    return [int(t) for t in to_numpy(tokens)]


def generate_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    *,
    num_blocks: int,
    block_size: int = 16,
    eos_token_id: int | None = None,
    max_batch_size: int | None = None,
    batch_invariant: bool = True,
) -> list[list[int]]:
    """Greedy generation for many prompts by continuous batching over a paged cache.

    ``max_new_tokens`` is one int for all, or one per prompt. Returns each request's
    new tokens, in request order: the same tokens ``model.generate`` gives each alone
    (``batch_invariant=False`` trades that guarantee for speed: see
    ``Model.decode_batch``).
    """
    if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool):
        counts = [max_new_tokens] * len(prompts)
    else:
        counts = list(max_new_tokens)
        if len(counts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(counts)} max_new_tokens")
    scheduler = Scheduler(
        model,
        num_blocks=num_blocks,
        block_size=block_size,
        max_batch_size=max_batch_size,
        batch_invariant=batch_invariant,
    )
    for prompt, count in zip(prompts, counts, strict=True):
        scheduler.add(prompt, count, eos_token_id)
    return scheduler.run()
