"""The KV-cache manager on the host, no model: random op sequences never leak or share a page, an allocation the
pool cannot cover returns None and changes nothing, and exact page ids, reference counts and eviction order of the
prefix cache (as vLLM tests its block pool)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from serve.kv_cache_manager import KVCacheManager

# Mixed kinds of hashable ids, since a serving engine may key sequences by request objects or strings.
SEQ_IDS = st.sampled_from([0, 1, 2, 3, "a", ("req", 7)])
PROBE_ID = "probe"  # never in SEQ_IDS: used on a copy to drain the free list


class AllocatorMachine(RuleBasedStateMachine):
    """Drives a small pool through allocate/grow/release against a model of how many tokens each sequence asked for."""

    @initialize(num_pages=st.integers(1, 10), page_size=st.integers(1, 4))
    def create(self, num_pages, page_size):
        self.allocator = KVCacheManager(num_pages, page_size)
        self.max_tokens: dict = {}

    def snapshot(self) -> tuple:
        tables = {seq_id: self.allocator.block_table(seq_id) for seq_id in self.max_tokens}
        return self.allocator.num_free_pages, tables

    @rule(seq_id=SEQ_IDS, num_tokens=st.integers(0, 24))
    def allocate(self, seq_id, num_tokens):
        allocator = self.allocator
        old_table = allocator.block_table(seq_id) if seq_id in allocator else []
        missing = max(0, allocator.pages_needed(num_tokens) - len(old_table))
        fits = missing <= allocator.num_free_pages

        if not fits:
            before = self.snapshot()
            assert allocator.allocate(seq_id, num_tokens) is None
            assert self.snapshot() == before and (seq_id in allocator) == (seq_id in self.max_tokens)
            return

        new_pages = allocator.allocate(seq_id, num_tokens)
        assert len(new_pages) == missing
        assert allocator.block_table(seq_id) == old_table + new_pages
        self.max_tokens[seq_id] = max(num_tokens, self.max_tokens.get(seq_id, 0))

    @precondition(lambda self: self.max_tokens)
    @rule(data=st.data())
    def release(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.max_tokens, key=repr)))
        freed = self.allocator.block_table(seq_id)
        free_before = self.allocator.num_free_pages
        self.allocator.release(seq_id)
        del self.max_tokens[seq_id]
        assert seq_id not in self.allocator
        assert self.allocator.num_free_pages == free_before + len(freed)
        # Released pages come back out first, in their old order.
        if freed:
            assert self.allocator.allocate(PROBE_ID, len(freed) * self.allocator.page_size) == freed
            self.allocator.release(PROBE_ID)

    @rule(seq_id=SEQ_IDS)
    def release_unknown(self, seq_id):
        if seq_id not in self.max_tokens:
            with pytest.raises(KeyError, match="unknown sequence"):
                self.allocator.release(seq_id)

    @invariant()
    def pages_are_exactly_partitioned(self):
        allocator = self.allocator
        owned = [page for seq_id in self.max_tokens for page in allocator.block_table(seq_id)]
        assert len(owned) == len(set(owned)), "a page is owned by two sequences"
        assert allocator.num_used_pages == len(owned)
        assert allocator.num_free_pages + len(owned) == allocator.num_pages
        for seq_id, num_tokens in self.max_tokens.items():
            assert len(allocator.block_table(seq_id)) == math.ceil(num_tokens / allocator.page_size)

        # Drain the free list on a copy: it must hold exactly the unowned pages, each once.
        drained = copy.deepcopy(allocator)
        free = drained.allocate(PROBE_ID, drained.num_free_pages * drained.page_size)
        assert len(free) == len(set(free)) and set(free) | set(owned) == set(range(allocator.num_pages))
        assert drained.num_free_pages == 0

    def teardown(self):
        for seq_id in self.max_tokens:
            self.allocator.release(seq_id)
        assert self.allocator.num_free_pages == self.allocator.num_pages and self.allocator.num_used_pages == 0


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


def test_fresh_pool_gives_batch_contiguous_tables():
    allocator = KVCacheManager(num_pages=16, page_size=4)
    for seq_id in range(3):
        allocator.allocate(seq_id, 10)
    assert [allocator.block_table(seq_id) for seq_id in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert allocator.allocate(0, 13) == [9]  # growing takes the next free page
    assert allocator.allocate(0, 5) == [] and allocator.block_table(0) == [0, 1, 2, 9]  # never shrinks


def test_block_table_is_a_copy():
    allocator = KVCacheManager(num_pages=4, page_size=2)
    allocator.allocate("s", 3)
    allocator.block_table("s").append(3)
    assert allocator.block_table("s") == [0, 1]


def test_block_tables_pads_with_page_zero():
    allocator = KVCacheManager(num_pages=8, page_size=2)
    allocator.allocate("a", 5)
    allocator.allocate("b", 1)
    allocator.allocate("c", 0)
    tables = allocator.block_tables(iter(["b", "a", "c"]), width=4)
    assert tables.dtype == np.int32 and tables.shape == (3, 4)
    np.testing.assert_array_equal(tables, [[3, 0, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]])
    assert allocator.block_tables([], width=4).shape == (0, 4)
    with pytest.raises(ValueError, match="'a' holds 3 pages, more than the table width 2"):
        allocator.block_tables(["b", "a"], width=2)
    with pytest.raises(KeyError, match="unknown sequence 'z'"):
        allocator.block_tables(["a", "z"], width=4)


def test_out_of_pages_is_all_or_nothing():
    allocator = KVCacheManager(num_pages=3, page_size=4)
    allocator.allocate(0, 4)
    assert allocator.allocate(1, 12) is None
    assert 1 not in allocator and allocator.num_free_pages == 2
    assert allocator.allocate(0, 4) == []  # already covered: needs no pages
    assert allocator.allocate(1, 8) == [1, 2] and allocator.num_free_pages == 0
    assert allocator.allocate(1, 9) is None and allocator.block_table(1) == [1, 2]


@pytest.mark.parametrize(
    "num_pages, page_size, message",
    [(0, 4, "num_pages must be >= 1, got 0"), (4, 0, "page_size must be >= 1, got 0"), (2.5, 4, "must be an integer")],
)
def test_bad_pool_shape_is_refused(num_pages, page_size, message):
    with pytest.raises(ValueError, match=message):
        KVCacheManager(num_pages, page_size)


def test_bad_requests_are_refused():
    allocator = KVCacheManager(num_pages=4, page_size=4)
    assert allocator.pages_needed(np.int64(9)) == 3 and allocator.pages_needed(0) == 0
    with pytest.raises(ValueError, match="num_tokens must be >= 0, got -1"):
        allocator.allocate("s", -1)
    with pytest.raises(ValueError, match="num_tokens must be an integer, got True"):
        allocator.allocate("s", True)
    assert "s" not in allocator and allocator.num_free_pages == 4
    with pytest.raises(KeyError, match="unknown sequence 's'"):
        allocator.release("s")
    with pytest.raises(KeyError, match="unknown sequence 's'"):
        allocator.block_table("s")
    with pytest.raises(ValueError, match="width must be >= 0"):
        allocator.block_tables([], width=-1)


def test_prefix_pages_are_shared_reference_counted_and_evicted_last():
    allocator = KVCacheManager(num_pages=6, page_size=4)
    prompt = list(range(10, 21))  # 11 tokens: 2 full pages and a partial one
    allocator.allocate("a", len(prompt))
    allocator.cache_prefix("a", prompt)
    assert allocator.num_cached_pages == 2

    # Same 8-token prefix, different tail: shares a's two full pages; the last token is never covered.
    assert allocator.share_prefix("b", prompt[:8] + [99, 98, 97]) == 8
    assert allocator.block_table("b") == allocator.block_table("a")[:2]
    assert allocator.share_prefix("c", prompt[:8]) == 4  # 8 tokens: only the first page, the 8th token is computed
    assert allocator.share_prefix("d", [1, 2, 3, 4, 5]) == 0
    allocator.allocate("b", 11)
    assert allocator.num_free_pages == 6 - 3 - 1

    allocator.release("a")  # only a's own third page comes free: b and c still hold the shared pages
    assert allocator.num_free_pages == 3
    owned = {p for s in ("b", "c", "d") for p in allocator.block_table(s)}
    assert len(owned) == 3
    for seq in ("b", "c", "d"):
        allocator.release(seq)
    assert allocator.num_free_pages == 6 and allocator.num_cached_pages == 2

    # Released cached pages are still found, and handed out last: 4 fresh pages leave them cached.
    allocator.allocate("e", 16)
    assert allocator.num_cached_pages == 2 and allocator.share_prefix("f", prompt) == 8
    assert allocator.num_free_pages == 0
    allocator.release("f")
    allocator.release("e")
    allocator.allocate("g", 24)  # the whole pool: the cached pages are evicted
    assert allocator.num_cached_pages == 0 and allocator.share_prefix("h", prompt) == 0


def test_shared_prefix_must_start_a_sequence():
    allocator = KVCacheManager(num_pages=2, page_size=4)
    allocator.allocate("a", 4)
    with pytest.raises(ValueError, match="already has pages"):
        allocator.share_prefix("a", [1, 2, 3, 4, 5])


def test_exact_page_ids_through_sharing_freeing_and_eviction():
    """vLLM's block-pool walk-through at 16-token pages and 11 pages: exact ids as requests share, free and evict."""
    manager = KVCacheManager(num_pages=11, page_size=16)
    common = list(range(100, 132))  # two full pages shared by every prompt below
    first = common + list(range(7))  # 39 tokens: pages 0, 1 full, page 2 partial
    assert manager.share_prefix("r0", first) == 0
    assert manager.allocate("r0", len(first)) == [0, 1, 2]
    manager.cache_prefix("r0", first)

    second = common + list(range(50, 60))
    assert manager.share_prefix("r1", second) == 32  # pages 0 and 1, now referenced twice
    assert manager.block_table("r1") == [0, 1] and manager.allocate("r1", len(second)) == [3]
    assert manager.num_free_pages == 11 - 4

    manager.release("r0")  # page 2 (uncached) is free again; 0 and 1 stay with r1
    assert manager.num_free_pages == 8
    assert manager.allocate("r2", 16) == [2]  # uncached pages are handed out first, the freed one before new ones
    manager.release("r1")
    # Free list now: r1's uncached page 3 (reused first), never-used 4..10, then the cached 1, 0 (tail first).
    assert manager.allocate("r3", 8 * 16) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert manager.num_cached_pages == 2 and manager.share_prefix("r4", second) == 32
    assert manager.block_table("r4") == [0, 1] and manager.num_free_pages == 0
    manager.release("r4")
    manager.release("r3")
    # Taking the whole pool evicts the cached pages last: 1 then 0 go out as the final two ids.
    assert manager.allocate("r5", 10 * 16)[-2:] == [1, 0] and manager.num_cached_pages == 0
    assert manager.share_prefix("r6", second) == 0
