"""Host-side bookkeeping of a paged KV cache's page pool: which sequence owns which pages, in token order.

Kept in plain Python so a scheduler can admit, grow and preempt sequences between steps without touching the device.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Hashable, Iterable

import numpy as np

from qoq_jax.errors import QoQError


class OutOfPagesError(QoQError):
    """The pool cannot cover a request; nothing was allocated, so the caller may preempt a sequence and retry."""

    def __init__(self, seq_id: Hashable, pages_needed: int, pages_free: int):
        super().__init__(f"sequence {seq_id!r} needs {pages_needed} more KV-cache pages but only {pages_free} are free")
        self.pages_needed = pages_needed
        self.pages_free = pages_free


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


class PageAllocator:
    """Owns page ids 0..num_pages-1; every call costs O(pages it touches), never O(pool)."""

    def __init__(self, num_pages: int, page_size: int):
        self._num_pages = _count("num_pages", num_pages, 1)
        self._page_size = _count("page_size", page_size, 1)
        # Low ids first, so sequences allocated in order on a fresh pool get contiguous tables.
        self._free_pages: deque[int] = deque(range(self._num_pages))
        self._tables: dict[Hashable, list[int]] = {}

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

    def can_allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Lets a scheduler decide on admission or preemption without catching exceptions."""
        return self._missing_pages(seq_id, num_tokens) <= len(self._free_pages)

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Grow seq_id's table to cover num_tokens tokens in total and return only the pages added.

        Taking the total rather than a delta makes repeated calls idempotent, and a smaller total never shrinks the
        table: pages only come back through `release`. A new seq_id is registered even when it needs no pages yet.
        """
        missing = self._missing_pages(seq_id, num_tokens)
        if missing > len(self._free_pages):
            raise OutOfPagesError(seq_id, missing, len(self._free_pages))
        new_pages = [self._free_pages.popleft() for _ in range(missing)]
        self._tables.setdefault(seq_id, []).extend(new_pages)
        return new_pages

    def release(self, seq_id: Hashable) -> None:
        """Return every page of seq_id to the pool; they are handed out again before never-used ones."""
        pages = self._tables.pop(seq_id, None)
        if pages is None:
            raise KeyError(f"unknown sequence {seq_id!r}: it was never allocated or is already released")
        # extendleft reverses, so feed it reversed to hand the pages back out in their old order.
        self._free_pages.extendleft(reversed(pages))

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
