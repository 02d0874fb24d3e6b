"""The scheduler: pure host logic over request state, one `SchedulerOutput` per step (vLLM v1's shape).

Every running sequence catches up: it is scheduled the tokens it holds that the KV cache lacks
(`num_tokens - num_computed`), within a token budget per step. A decoding sequence lacks one, its last sampled
token, which the device already holds in the sequence's slot; a sequence in prefill (a new prompt, or prompt and
generated tokens recomputed after preemption) gets a chunk of up to `max_prefill_rows` rows of
`prefill_row_tokens` tokens. There are no prefill and decode modes, only how far each sequence has caught up:

    budget 8, rows of 4           step N                        step N+1
    a  decoding (slot 0)          1 token  (from the device)    1 token
    b  prompt of 9, 0 computed    rows [0:4] [4:8]              row [8:9] → samples its first token
    c  waiting                    (budget spent)                admitted: row [0:4]

Steps overlap: step N+1 is planned before step N's sampled tokens reach the host. A sampled token not yet read
back is pending (`num_pending`): it counts in `num_tokens` and a decoding sequence is scheduled on it as if it were
known, so the stop rules run one step behind and a sequence that stopped at step N still has a row in step N+1,
whose token is discarded. Pages are reserved when a step is planned, one token ahead of what the device has
written. A sequence whose step could not get pages preempts the youngest running sequence (by arrival; possibly
itself): its pages and slot are freed and it waits at the front of the queue to be recomputed, never dropped.
Admission never preempts: a new request waits until pages are free.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses

from serve.kv_cache_manager import KVCacheManager
from serve.request import Request


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's state on the host."""

    request: Request
    order: int  # arrival order: the largest is the youngest, preempted first
    max_num_tokens: int  # prompt + max_tokens: no step is planned past it
    token_ids: list[int]  # prompt, then every sampled token read back
    held_stop_ids: tuple[int, ...] = ()  # with min_tokens: its stop ids (EOS included), held back until then
    shares_prefix: bool = True  # may start on cached pages (not with penalties or prompt logprobs: see _admit)
    slot: int | None = None  # its row in the device batch while running
    capacity: int = 0  # tokens its pages hold
    num_computed: int = 0  # tokens whose keys and values the planned steps write
    num_pending: int = 0  # sampled tokens not read back yet
    on_device: bool = False  # its last token is in its device slot: it decodes from there
    epoch: int = 0  # +1 at each preemption: results of an older epoch refer to pages it no longer holds
    proven: bool = False  # a step of it has run: a failing step is not its fault if it holds a newer one
    suspect: bool = False  # new in a failed step beside other new ones: admitted as the only new one of a step
    failures: int = 0  # failed steps it was in without a single new request to blame
    cached_through: int = 0  # tokens in pages registered in the prefix cache: the next registration is a page on
    finished: bool = False
    state: object = None  # the output processor's per-sequence state

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def decoding(self) -> bool:
        return self.on_device and self.num_computed == self.num_tokens - 1


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """Tokens start..start+num_tokens of a sequence; `samples` when they end at its last token."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool


@dataclasses.dataclass(frozen=True)
class TableUpdate:
    """Pages to write into a slot's device block table from `first_index` on."""

    slot: int
    first_index: int
    pages: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """One step's work. Decode rows feed each sequence's last token from its device slot at `decode_positions`;
    chunks carry their tokens from the host; `table_updates` are the page ids the step's block tables gain."""

    decode: tuple[Sequence, ...]
    decode_positions: tuple[int, ...]
    chunks: tuple[ScheduledChunk, ...]
    table_updates: tuple[TableUpdate, ...]
    num_preempted: int

    @property
    def empty(self) -> bool:
        return not self.decode and not self.chunks


class Scheduler:
    """Owns the waiting queue, the running set (by arrival), the device slots and the KV-cache manager."""

    def __init__(
        self,
        kv_cache: KVCacheManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_prefill_rows: int,
        prefill_row_tokens: int,
        prefix_caching: bool = True,
    ):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be ≥ max_num_seqs ({max_num_seqs}) so that "
                "every running sequence decodes in every step"
            )
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_rows = max_prefill_rows
        self.prefill_row_tokens = prefill_row_tokens
        self.prefix_caching = prefix_caching
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # by arrival order
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0
        self.num_prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- planning a step ---------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """One pass over the running sequences by arrival (so a preemption only ever hits a sequence not yet
        planned, or the one being planned), then admissions while budget, rows, slots and pages last. Prompt
        chunks leave enough budget for every decoding sequence."""
        budget, rows = self.max_num_batched_tokens, self.max_prefill_rows
        updates: list[TableUpdate] = []
        preempted_before = self.num_preemptions
        decode, positions, chunks = [], [], []
        running = list(self.running)
        decoding = sum(1 for s in running if s.decoding and s.num_tokens < s.max_num_tokens)
        for seq in running:  # the hot loop at large batches: plain attributes, pages only at page boundaries
            if seq.slot is None:
                continue  # preempted in this pass
            computed = seq.num_computed
            if seq.on_device and computed == len(seq.token_ids) + seq.num_pending - 1:  # decoding
                if computed + 1 >= seq.max_num_tokens:
                    continue  # every token it may have is sampled; it finishes when they are read back
                decoding -= 1
                if computed < seq.capacity or self._grow(seq, computed + 1, updates):
                    decode.append(seq)
                    positions.append(computed)
                    seq.num_computed = computed + 1
                    seq.num_pending += 1
                    budget -= 1
                continue
            size = self._chunk_size(seq, budget - decoding, rows)
            if size >= 1 and self._grow(seq, seq.num_computed + size, updates):
                budget, rows = self._add_chunk(seq, size, chunks, budget, rows)
        while self.waiting and budget >= 1 and rows >= 1 and self._free_slots:
            seq = self.waiting[0]
            if seq.num_pending or self._must_wait_alone(seq, chunks) or not self._admit(seq, budget, rows, updates):
                break  # its last tokens are on the way, it is a suspect, or the pool must free pages first
            budget, rows = self._add_chunk(seq, self._chunk_size(seq, budget, rows), chunks, budget, rows)
            if seq.suspect:
                break  # nothing new beside it in its first step
        return SchedulerOutput(
            decode=tuple(decode),
            decode_positions=tuple(positions),
            chunks=tuple(chunks),
            table_updates=tuple(updates),
            num_preempted=self.num_preemptions - preempted_before,
        )

    def _must_wait_alone(self, seq: Sequence, chunks: list[ScheduledChunk]) -> bool:
        """A suspect is the one new sequence of its first step: it waits for everything unproven to have run a
        step, and nothing new joins it before it has."""
        if any(s.suspect and not s.proven for s in self.running):
            return True
        return seq.suspect and (any(not s.proven for s in self.running) or any(not c.seq.proven for c in chunks))

    def _chunk_size(self, seq: Sequence, budget: int, rows: int) -> int:
        return min(seq.num_tokens - seq.num_computed, budget, rows * self.prefill_row_tokens)

    def _add_chunk(self, seq: Sequence, size: int, chunks: list, budget: int, rows: int) -> tuple[int, int]:
        samples = seq.num_computed + size == seq.num_tokens
        chunks.append(ScheduledChunk(seq, seq.num_computed, size, samples))
        seq.num_computed += size
        if samples:
            seq.num_pending += 1
            seq.on_device = True
        return budget - size, rows - -(-size // self.prefill_row_tokens)

    def _admit(self, seq: Sequence, budget: int, rows: int, updates: list[TableUpdate]) -> bool:
        """Takes the head of the queue into the running set: the cached pages of its longest cached prefix,
        then pages for its first chunk; False (holding nothing) when the pool cannot cover that chunk."""
        seq_id = seq.request_id
        if self.prefix_caching and seq.shares_prefix:  # else its history and prompt logprobs need every token
            seq.num_computed = self.kv_cache.share_prefix(seq_id, seq.token_ids)
        if self.kv_cache.allocate(seq_id, seq.num_computed + self._chunk_size(seq, budget, rows)) is None:
            if seq_id in self.kv_cache:  # the shared prefix it holds (nothing when it shares none)
                self.kv_cache.release(seq_id)
            seq.num_computed = 0
            return False
        self.num_prefix_hit_tokens += seq.num_computed
        self.waiting.popleft()
        seq.slot = self._free_slots.pop()
        bisect.insort(self.running, seq, key=lambda s: s.order)
        table = self.kv_cache.block_table(seq_id)
        updates.append(TableUpdate(seq.slot, 0, tuple(table)))
        seq.capacity = len(table) * self.kv_cache.page_size
        seq.cached_through = seq.num_computed  # the shared pages
        return True

    def _grow(self, seq: Sequence, num_tokens: int, updates: list[TableUpdate]) -> bool:
        """Pages for seq's first `num_tokens` tokens, preempting the youngest running sequences (possibly seq
        itself, which then returns False) until they fit."""
        seq_id = seq.request_id
        before = self.kv_cache.num_pages_of(seq_id)
        while (added := self.kv_cache.allocate(seq_id, num_tokens)) is None:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        if added:
            updates.append(TableUpdate(seq.slot, before, tuple(added)))
            seq.capacity = (before + len(added)) * self.kv_cache.page_size
        return True

    # --- changes of state ----------------------------------------------------------------------------------

    def preempt(self, seq: Sequence) -> None:
        """Frees seq's pages and slot and puts it at the front of the queue, to be recomputed."""
        self._release(seq)
        seq.num_computed, seq.on_device = 0, False
        seq.epoch += 1
        index = 0
        while index < len(self.waiting) and self.waiting[index].order < seq.order:
            index += 1  # older preempted sequences stay ahead of it
        self.waiting.insert(index, seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Takes seq out of the queue or the running set for good, freeing what it holds."""
        if seq.slot is not None:
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.finished = True

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv_cache.release(seq.request_id)
        self._free_slots.append(seq.slot)
        seq.slot, seq.capacity = None, 0

    def cache_prefix(self, seq: Sequence, epoch: int, num_computed: int) -> None:
        """Registers seq's full pages among its first `num_computed` tokens (written by a step planned in
        `epoch`, their token ids all read back) in the prefix cache."""
        if seq.epoch != epoch or seq.slot is None:
            return  # preempted since: those pages are no longer its
        if self.prefix_caching:
            self.kv_cache.cache_prefix(seq.request_id, seq.token_ids, num_computed)
        seq.cached_through = num_computed - num_computed % self.kv_cache.page_size
