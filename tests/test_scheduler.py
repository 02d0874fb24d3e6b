"""The scheduler on the host, no model (as vLLM tests its scheduler): exact page ids, rows, table updates,
preemption victims and the overlap bookkeeping (steps planned on tokens not read back yet)."""

from __future__ import annotations

from serve.kv_cache_manager import KVCacheManager
from serve.request import Request
from serve.scheduler import ScheduledChunk, Scheduler, Sequence, TableUpdate

PAGE = 16


def _scheduler(num_pages=11, **options):
    defaults = dict(max_num_seqs=4, max_num_batched_tokens=40, max_prefill_rows=2, prefill_row_tokens=16)
    return Scheduler(KVCacheManager(num_pages, PAGE), **{**defaults, **options})


def _sequence(scheduler, name, prompt, max_tokens=100, order=None):
    order = len(scheduler.waiting) + len(scheduler.running) if order is None else order
    request = Request(name, tuple(prompt), max_tokens)
    seq = Sequence(request, order, len(prompt) + max_tokens, list(prompt))
    scheduler.add(seq)
    return seq


def _read_back(scheduled, token=7):
    """What the engine does when a step's tokens arrive: every sampling row's token is appended."""
    for seq in scheduled.decode:
        seq.num_pending -= 1
        seq.token_ids.append(token)
    for chunk in scheduled.chunks:
        if chunk.samples:
            chunk.seq.num_pending -= 1
            chunk.seq.token_ids.append(token)


def test_a_prompt_is_chunked_in_rows_then_decodes_one_token_a_step():
    scheduler = _scheduler()
    a = _sequence(scheduler, "a", range(100, 140))  # 40 tokens: 2 rows now, the last 8 next step
    first = scheduler.schedule()
    assert first.chunks == (ScheduledChunk(a, 0, 32, False),) and not first.decode
    assert first.table_updates == (TableUpdate(0, 0, (0, 1)),) and a.slot == 0
    second = scheduler.schedule()  # planned before the first ran: a chunk needs no sampled token
    assert second.chunks == (ScheduledChunk(a, 32, 8, True),) and second.table_updates == (TableUpdate(0, 2, (2,)),)
    assert a.num_pending == 1 and a.decoding  # its first sampled token is on its way
    third = scheduler.schedule()  # planned on that token before it is read back: it stays on the device
    assert third.decode == (a,) and third.decode_positions == (40,) and third.table_updates == ()
    assert a.num_pending == 2
    _read_back(second)
    _read_back(third)
    assert a.num_pending == 0 and a.token_ids[40:] == [7, 7] and a.num_computed == 41
    for position in range(41, 48):
        assert scheduler.schedule().decode_positions == (position,)
    step = scheduler.schedule()  # position 48 starts page 3: reserved when planned
    assert step.decode_positions == (48,) and step.table_updates == (TableUpdate(0, 3, (3,)),)


def test_decodes_keep_their_budget_and_prompts_share_the_rest():
    scheduler = _scheduler(max_num_batched_tokens=20)
    a = _sequence(scheduler, "a", range(10))
    _read_back(scheduler.schedule())  # a: the whole prompt, sampled
    b = _sequence(scheduler, "b", range(50, 90))
    c = _sequence(scheduler, "c", range(60, 70))
    step = scheduler.schedule()
    # a decodes; 19 tokens are left: b takes rows of 16 and 3, and c waits for the next step.
    assert step.decode == (a,)
    assert step.chunks == (ScheduledChunk(b, 0, 19, False),) and c.slot is None
    assert [u for u in step.table_updates if u.slot == b.slot] == [TableUpdate(b.slot, 0, (1, 2))]
    step = scheduler.schedule()
    assert step.decode == (a,) and step.chunks == (ScheduledChunk(b, 19, 19, False),)
    assert c.slot is None, "both rows went to b again"
    step = scheduler.schedule()
    assert step.chunks == (ScheduledChunk(b, 38, 2, True), ScheduledChunk(c, 0, 10, True))


def test_no_step_is_planned_past_max_tokens():
    scheduler = _scheduler()
    a = _sequence(scheduler, "a", range(5), max_tokens=3)
    plans = [scheduler.schedule() for _ in range(4)]
    assert [len(p.decode) for p in plans] == [0, 1, 1, 0]  # sampled by the prefill, then two decodes: three in all
    assert a.num_tokens == 8 == a.max_num_tokens and a.num_pending == 3


def test_the_youngest_is_preempted_and_recomputed_with_its_generated_tokens():
    """Four pages: a (arrived first) and b fill them; when a needs a fifth page, b is preempted, and later
    recomputed from its prompt and what it generated, never dropped."""
    scheduler = _scheduler(num_pages=4, max_num_batched_tokens=64, max_prefill_rows=4)
    a = _sequence(scheduler, "a", range(100, 131))  # 31 tokens: pages 0, 1
    b = _sequence(scheduler, "b", range(200, 232))  # 32 tokens: pages 2, 3
    step = scheduler.schedule()
    assert [(c.seq, c.num_tokens) for c in step.chunks] == [(a, 31), (b, 32)]
    assert step.table_updates == (TableUpdate(0, 0, (0, 1)), TableUpdate(1, 0, (2, 3)))
    _read_back(step)
    step = scheduler.schedule()  # a decodes at 31 (page 1); b at 32 needs a page: none left, b itself yields
    assert step.decode == (a,) and step.num_preempted == 1 and list(scheduler.waiting) == [b]
    assert b.slot is None and b.num_computed == 0 and b.token_ids == list(range(200, 232)) + [7]
    assert scheduler.kv_cache.num_free_pages == 2 and b.num_pending == 0
    _read_back(step)
    step = scheduler.schedule()  # a at 32 takes page 2 (b's pages come back in their old order); b gets 3 only
    assert step.decode == (a,) and step.table_updates[0] == TableUpdate(0, 2, (2,))
    assert step.chunks == () and scheduler.kv_cache.num_free_pages == 1, "b's 33 tokens need 3 pages: it waits"
    scheduler.finish(a)
    step = scheduler.schedule()
    assert step.chunks == (ScheduledChunk(b, 0, 33, True),) and step.table_updates == (TableUpdate(0, 0, (0, 1, 2)),)


def test_a_sequence_is_preempted_while_its_token_is_still_on_the_device():
    """Steps planned one ahead of what was read back, as the engine runs them: when the pool runs out, b (the
    youngest) yields while its last sampled token is still on the device; b is recomputed only after that token
    was read back, and keeps it."""
    scheduler = _scheduler(num_pages=3, max_num_batched_tokens=64, max_prefill_rows=4)
    a = _sequence(scheduler, "a", range(100, 116))  # page 0, then page 2 from position 16
    b = _sequence(scheduler, "b", range(200, 208))  # page 1: full at position 16
    in_flight = scheduler.schedule()
    while True:
        step = scheduler.schedule()
        if step.num_preempted:
            break
        _read_back(in_flight)
        in_flight = step
    assert step.decode == (a,) and step.decode_positions == (24,) and list(scheduler.waiting) == [b]
    assert b.num_pending == 1 and b.slot is None and b.request_id not in scheduler.kv_cache
    assert scheduler.schedule().chunks == (), "b's last token is not back yet"
    _read_back(in_flight)
    assert b.num_pending == 0 and len(b.token_ids) == 8 + 9 and b.token_ids[-1] == 7  # its prompt, 9 sampled
    scheduler.finish(a)
    assert scheduler.schedule().chunks == (ScheduledChunk(b, 0, 17, True),)


def test_admission_waits_for_pages_and_takes_cached_prefixes():
    scheduler = _scheduler(num_pages=4, max_num_batched_tokens=64, max_prefill_rows=4)
    prompt = list(range(300, 340))  # 40 tokens: pages 0, 1 full
    a = _sequence(scheduler, "a", prompt, max_tokens=8)
    step = scheduler.schedule()
    scheduler.cache_prefix(a, a.epoch, 40)
    b = _sequence(scheduler, "b", prompt[:32] + [1, 2, 3], max_tokens=8)
    step = scheduler.schedule()
    # b shares a's two full pages (32 tokens computed already) and gets page 3 for the rest.
    assert step.chunks == (ScheduledChunk(b, 32, 3, True),) and step.table_updates == (TableUpdate(1, 0, (0, 1, 3)),)
    assert scheduler.num_prefix_hit_tokens == 32
    c = _sequence(scheduler, "c", range(500, 560), max_tokens=4)  # needs 4 pages: waits, preempting nobody
    assert scheduler.schedule().chunks == () and c.slot is None and scheduler.num_preemptions == 0
    assert c.request_id not in scheduler.kv_cache


def test_a_suspect_is_admitted_as_the_only_new_sequence_of_its_step():
    scheduler = _scheduler(max_prefill_rows=4, max_num_batched_tokens=64)
    suspect = _sequence(scheduler, "s", range(5), order=0)
    suspect.suspect = True
    other = _sequence(scheduler, "o", range(9), order=1)
    step = scheduler.schedule()
    assert [c.seq for c in step.chunks] == [suspect], "nothing new beside a suspect"
    step = scheduler.schedule()
    assert step.chunks == () and other.slot is None, "the suspect has not run a step yet"
    suspect.proven = True
    assert [c.seq for c in scheduler.schedule().chunks] == [other]
    late = _sequence(scheduler, "late", range(3), order=2)
    late.suspect = True
    assert scheduler.schedule().chunks == () and late.slot is None, "other has not run a step yet"
