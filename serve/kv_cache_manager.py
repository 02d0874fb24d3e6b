"""The KV-cache manager: host-side bookkeeping of the paged pool (which sequence owns which pages, in token order)
and the prefix cache (which full pages hold a known token prefix).

Plain Python, so the scheduler admits, grows and preempts sequences between steps without touching the device; the
runner learns the page ids a step added and writes only those into its device tables. A request the pool cannot
cover gets `None` from `allocate` and nothing changes, so the scheduler decides whom to preempt (vLLM's
`allocate_slots`). A full page whose tokens (and all tokens before them) are known is registered under a hash chain
of its token blocks; a later sequence with the same prefix shares it (reference-counted) instead of recomputing it.
A released cached page stays findable until the free list hands it out again, least recently released last.

    pool   [ 0 1 2 3 4 5 6 7 ]          page_size 4
    "a"    [ 0 1 2 ]   tokens 0..10      pages 0, 1 full: cached under h(t0..3), h(h0, t4..7)
    "b"    [ 0 1 5 ]   same 8-token prefix: shares 0 and 1 (2 references each), computes from token 8
"""

from __future__ import annotations

import hashlib
import operator
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence

import numpy as np


def _count(name: str, value: int, minimum: int) -> int:
    """Accept numpy integers as well as ints, but refuse floats and bools that would silently truncate."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class KVCacheManager:
    """Owns page ids 0..num_pages-1; every call costs O(pages it touches), never O(pool)."""

    def __init__(self, num_pages: int, page_size: int):
        self._num_pages = _count("num_pages", num_pages, 1)
        self._page_size = _count("page_size", page_size, 1)
        # Low ids first, so sequences allocated in order on a fresh pool get contiguous tables. Insertion order is
        # the order pages are handed out; cached pages go to the back so they survive longest.
        self._free_pages: OrderedDict[int, None] = OrderedDict.fromkeys(range(self._num_pages))
        self._tables: dict[Hashable, list[int]] = {}
        self._references: dict[int, int] = {}
        self._page_of_prefix: dict[bytes, int] = {}
        self._prefix_of_page: dict[int, bytes] = {}
        self._hashed: dict[Hashable, tuple[int, bytes]] = {}  # per sequence: pages hashed so far, the last digest

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def num_used_pages(self) -> int:
        return self._num_pages - len(self._free_pages)

    def pages_needed(self, num_tokens: int) -> int:
        num_tokens = _count("num_tokens", num_tokens, 0)
        return -(-num_tokens // self._page_size)

    def _missing_pages(self, seq_id: Hashable, num_tokens: int) -> int:
        return max(0, self.pages_needed(num_tokens) - len(self._tables.get(seq_id, ())))

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int] | None:
        """Grow seq_id's table to cover num_tokens tokens in total and return only the pages added, or None (and
        change nothing) when the free pages cannot cover it.

        Taking the total rather than a delta makes repeated calls idempotent, and a smaller total never shrinks the
        table: pages only come back through `release`. A new seq_id is registered even when it needs no pages yet.
        """
        missing = self._missing_pages(seq_id, num_tokens)
        if missing > len(self._free_pages):
            return None
        new_pages = [self._take_free_page() for _ in range(missing)]
        for page in new_pages:
            self._references[page] = 1
        self._tables.setdefault(seq_id, []).extend(new_pages)
        return new_pages

    def _take_free_page(self) -> int:
        page, _ = self._free_pages.popitem(last=False)
        prefix = self._prefix_of_page.pop(page, None)
        if prefix is not None:  # evicted from the prefix cache
            del self._page_of_prefix[prefix]
        return page

    def share_prefix(self, seq_id: Hashable, token_ids: Sequence[int]) -> int:
        """Starts a new sequence on the cached pages of its longest cached prefix and returns how many tokens
        they hold (a multiple of page_size). The last token is never covered, so the caller always computes at
        least one token and gets its logits."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has pages; share_prefix starts new sequences")
        table = self._tables.setdefault(seq_id, [])
        matched = b""
        for prefix in self._prefix_hashes(token_ids, 0, (len(token_ids) - 1) // self._page_size, b""):
            page = self._page_of_prefix.get(prefix)
            if page is None:
                break
            if self._references.get(page, 0) == 0:
                del self._free_pages[page]
            self._references[page] = self._references.get(page, 0) + 1
            table.append(page)
            matched = prefix
        self._hashed[seq_id] = (len(table), matched)
        return len(table) * self._page_size

    def cache_prefix(self, seq_id: Hashable, token_ids: Sequence[int], num_tokens: int | None = None) -> None:
        """Registers seq_id's full pages holding its first `num_tokens` tokens (default all of `token_ids`; the
        tokens whose keys and values are written, from position 0) so later sequences with the same prefix can
        share them. A prefix already cached elsewhere is left there. Only pages filled since the last call are
        hashed, so calling it every step costs nothing in between."""
        table = self._tables[seq_id]
        hashed, prefix = self._hashed.get(seq_id, (0, b""))
        num_tokens = len(token_ids) if num_tokens is None else num_tokens
        full_pages = min(num_tokens // self._page_size, len(table))
        for index, prefix in enumerate(self._prefix_hashes(token_ids, hashed, full_pages, prefix), start=hashed):
            page = table[index]
            if prefix not in self._page_of_prefix and page not in self._prefix_of_page:
                self._page_of_prefix[prefix] = page
                self._prefix_of_page[page] = prefix
        if full_pages > hashed:
            self._hashed[seq_id] = (full_pages, prefix)

    def _prefix_hashes(self, token_ids: Sequence[int], first_page: int, end_page: int, prefix: bytes):
        """The digest of each page from first_page to end_page, each page's tokens chained with the digest before
        it (`prefix`, the digest of the page before first_page), so equal digests mean equal prefixes (a
        cryptographic hash: a collision would silently serve another prompt's keys and values)."""
        for index in range(first_page, end_page):
            block = np.asarray(token_ids[index * self._page_size : (index + 1) * self._page_size], np.int64)
            prefix = hashlib.blake2b(prefix + block.tobytes(), digest_size=16).digest()
            yield prefix

    @property
    def num_cached_pages(self) -> int:
        """Pages registered in the prefix cache, in use or free."""
        return len(self._page_of_prefix)

    def release(self, seq_id: Hashable) -> None:
        """Return every page of seq_id to the pool; they are handed out again before never-used ones."""
        pages = self._tables.pop(seq_id, None)
        if pages is None:
            raise KeyError(f"unknown sequence {seq_id!r}: it was never allocated or is already released")
        self._hashed.pop(seq_id, None)
        for page in reversed(pages):
            self._references[page] -= 1
            if self._references[page] == 0:
                del self._references[page]
                self._free_pages[page] = None
                # Uncached pages are handed out again first, in their old order; cached ones last.
                self._free_pages.move_to_end(page, last=page in self._prefix_of_page)

    def num_pages_of(self, seq_id: Hashable) -> int:
        return len(self._tables[seq_id])

    def block_table(self, seq_id: Hashable) -> list[int]:
        """A copy, so callers cannot corrupt the pool's bookkeeping."""
        if seq_id not in self._tables:
            raise KeyError(f"unknown sequence {seq_id!r}: allocate it before asking for its block table")
        return list(self._tables[seq_id])

    def block_tables(self, seq_ids: Iterable[Hashable], width: int) -> np.ndarray:
        """Stack tables into the int32 [batch, width] array the attention kernels take.

        Padding is page 0, a valid id the kernels may gather from; the sequence lengths mask it out.
        """
        width = _count("width", width, 0)
        seq_ids = list(seq_ids)
        tables = [self.block_table(seq_id) for seq_id in seq_ids]
        stacked = np.zeros((len(tables), width), dtype=np.int32)
        for row, (seq_id, table) in enumerate(zip(seq_ids, tables, strict=True)):
            if len(table) > width:
                raise ValueError(f"sequence {seq_id!r} holds {len(table)} pages, more than the table width {width}")
            stacked[row, : len(table)] = table
        return stacked

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables
