"""Output processing against full re-decoding: the incremental text of every prefix is what the tokenizer decodes
from scratch (characters split over tokens included), stop strings cut where a search of the whole text would,
and the streamed deltas add up to the final text without ever showing a stop string."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import tiny_tokenizer

from qoq_jax.generate import Continuation
from serve.output import OutputProcessor
from serve.request import Request


@pytest.fixture(scope="module")
def tokenizer(gpl_text):
    """A byte-level BPE whose vocabulary holds every single byte: random ids split characters often."""
    return tiny_tokenizer(gpl_text)


def _reference(tokenizer, tokens, stop, max_new_tokens, stop_ids=frozenset()):
    """The rules by brute force: decode everything after every token, cut at the earliest stop string."""
    kept = []
    for token in tokens:
        if token in stop_ids:
            return kept, tokenizer.decode(kept, skip_special_tokens=True), "stop"
        kept.append(token)
        text = tokenizer.decode(kept, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            return kept[:-1], text[: min(hits)], "stop"
        if len(kept) == max_new_tokens:
            return kept, text, "length"
    return kept, tokenizer.decode(kept, skip_special_tokens=True), None


def test_incremental_text_equals_decoding_from_scratch(tokenizer):
    rng = np.random.default_rng(11)
    for _ in range(100):
        tokens = [int(t) for t in rng.integers(0, len(tokenizer), int(rng.integers(1, 40)))]
        continuation = Continuation([1], max_new_tokens=len(tokens), tokenizer=tokenizer)
        pieces = [continuation.append(t) for t in tokens]
        assert continuation.finish_reason == "length"
        expected = tokenizer.decode(tokens, skip_special_tokens=True)
        assert expected.startswith("".join(pieces)) and continuation.text == expected


def test_stop_strings_cut_where_a_whole_text_search_would(tokenizer, gpl_text):
    rng = np.random.default_rng(12)
    ids = tokenizer(gpl_text[:4000]).input_ids
    for _ in range(150):
        start = int(rng.integers(0, len(ids) - 60))
        tokens = ids[start : start + 50]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        stops = []
        for _ in range(int(rng.integers(1, 4))):  # pieces of the text (they occur), or strings that do not
            at, size = int(rng.integers(0, len(text))), int(rng.integers(1, 9))
            stops.append(text[at : at + size] if rng.random() < 0.8 else "§never§")
        limit = int(rng.integers(10, 60))
        continuation = Continuation([1], max_new_tokens=limit, stop=stops, tokenizer=tokenizer)
        continuation.extend(tokens)
        kept, expected_text, reason = _reference(tokenizer, tokens, stops, limit)
        assert (continuation.tokens, continuation.text) == (kept, expected_text), stops
        assert continuation.finish_reason == reason


def test_streamed_deltas_add_up_and_never_show_a_stop_string(tokenizer, gpl_text):
    rng = np.random.default_rng(13)
    ids = tokenizer(gpl_text[4000:9000]).input_ids
    processor = OutputProcessor(tokenizer, eos_ids=frozenset({2}))
    for trial in range(60):
        start = int(rng.integers(0, len(ids) - 60))
        tokens = ids[start : start + 40] + [2]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        at = int(rng.integers(0, len(text)))
        stop = (text[at : at + int(rng.integers(2, 7))],) if trial % 3 else ()
        request = Request(f"r{trial}", (1, 5), 64, stop=stop)
        state = processor.start(request)
        streamed, sent_ids, output = "", [], None
        for token in tokens:
            output = processor.append(request, state, token)
            streamed += output.new_text
            sent_ids += output.new_token_ids
            if stop and not output.finished:
                assert stop[0] not in streamed
            if output.finished:
                break
        kept, expected_text, reason = _reference(tokenizer, tokens, stop, 64, stop_ids=frozenset({2}))
        assert output.finished and output.finish_reason == reason == "stop"
        assert streamed == expected_text and output.num_generated_tokens == len(kept)
        assert sent_ids == kept[: len(sent_ids)] and len(sent_ids) >= len(kept) - 1 and 2 not in sent_ids
