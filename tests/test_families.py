"""Qwen3, Gemma 2 and 3, Phi-3 and Phi-4-mini against transformers, on tiny random models made from transformers'
own config classes, in float32: prefill (`forward`), decode through the paged cache, a right-padded batch, bfloat16,
greedy generation and the rotary frequencies of every layer. The logit errors are printed as a table at the end of
the run (pytest's terminal summary)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from parity_report import PARITY_PROPERTY
from tiny_models import build_hf_model, save_hf_model
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import qoq_jax
from qoq_jax.rope import inverse_frequencies
from serve.engine import build_engine
from serve.request import Request

FAMILIES = ("qwen3", "gemma2", "gemma3", "phi3", "phi4_mini_longrope")
LOGITS_RTOL = 1e-4  # float32, relative to the largest logit
# The tiny Phi-4-mini runs past LongRoPE's original context of 32 positions, so it uses the long factors at every
# length, where transformers switches per sequence length: comparisons use sequences past 32 tokens (transformers'
# long factors); `test_longrope_within_its_original_context_uses_the_short_factors` covers the other set.
PROMPT_LENGTHS = (37, 34, 33)
DECODE_STEPS = 4


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    hf_model: torch.nn.Module
    params: qoq_jax.Params
    bf16: qoq_jax.Params


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> Family:
    hf_model = build_hf_model(request.param, seed=len(request.param))
    hf_model.generation_config.eos_token_id = None
    directory = save_hf_model(hf_model, tmp_path_factory.mktemp(request.param))
    params = qoq_jax.load(directory, dtype="float32")
    return Family(request.param, hf_model, params, qoq_jax.load(directory, dtype="bfloat16"))


def relative_error(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - reference)) / np.max(np.abs(reference)))


def hf_logits(family: Family, token_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return family.hf_model(torch.tensor(token_ids)).logits.numpy()


@pytest.fixture
def record(record_property):
    """record(family, measurement, error): a row cell of the parity table printed after the run (conftest)."""
    return lambda family, column, error: record_property(PARITY_PROPERTY, (family.name, column, error))


def test_prefill_logits_match_transformers(family, record, rng):
    """48 tokens: past every window of the tiny models (16 or 24) and LongRoPE's original context (32)."""
    token_ids = rng.integers(0, family.params.config.vocab_size, (2, 48))
    error = relative_error(qoq_jax.forward(family.params, token_ids), hf_logits(family, token_ids))
    record(family, "forward", error)
    assert error <= LOGITS_RTOL


def test_padded_batch_prefill_and_paged_decode_match_transformers(family, record, rng):
    """Right-padded prompts of three lengths prefilled into the paged cache, then decoded token by token: the
    logits after each prompt and each decoded token equal transformers' on that row's sequence."""
    vocab = family.params.config.vocab_size
    lengths = np.array(PROMPT_LENGTHS)
    sequences = rng.integers(0, vocab, (len(lengths), lengths.max() + DECODE_STEPS))
    for row, length in enumerate(lengths):  # each row's continuation follows its own prompt directly
        sequences[row, length : length + DECODE_STEPS] = rng.integers(0, vocab, DECODE_STEPS)
    reference = {row: hf_logits(family, sequences[row : row + 1, : length + DECODE_STEPS])[0] for row, length in
                 enumerate(lengths)}
    prompts = np.where(np.arange(lengths.max())[None, :] < lengths[:, None], sequences[:, : lengths.max()], 0)
    state, logits = qoq_jax.prefill(family.params, prompts, lengths, max_length=64, page_size=16)
    padded = max(relative_error(logits[row], reference[row][length - 1]) for row, length in enumerate(lengths))
    decoded = 0.0
    for step in range(DECODE_STEPS):
        tokens = sequences[np.arange(len(lengths)), lengths + step]
        state, logits = qoq_jax.decode_step(family.params, state, tokens)
        decoded = max(
            decoded, *(relative_error(logits[row], reference[row][length + step]) for row, length in enumerate(lengths))
        )
    record(family, "padded prefill", padded)
    record(family, "paged decode", decoded)
    assert padded <= LOGITS_RTOL and decoded <= LOGITS_RTOL


def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(family, record, rng):
    """bf16 rounding moves logits by a few percent of their range on these models; ours must stay within twice
    what transformers' own bf16 model moves (both against transformers in float32)."""
    token_ids = rng.integers(0, family.params.config.vocab_size, (2, 40))
    reference = hf_logits(family, token_ids)
    with torch.no_grad():
        hf_bf16 = copy.deepcopy(family.hf_model).to(torch.bfloat16)(torch.tensor(token_ids)).logits.float().numpy()
    ours, theirs = (
        relative_error(qoq_jax.forward(family.bf16, token_ids), reference), relative_error(hf_bf16, reference)
    )
    record(family, "bf16 forward", ours)
    record(family, "hf bf16", theirs)
    assert ours <= 2 * theirs


@pytest.mark.parametrize("family", ["gemma2", "phi4_mini_longrope"], indirect=True)  # soft-cap, windows; LongRoPE
def test_greedy_generation_matches_transformers(family, rng):
    """Through `generate`'s buckets and compiled decode loop (the others' decode steps are checked above)."""
    prompt = rng.integers(3, family.params.config.vocab_size, 36).tolist()
    with torch.no_grad():
        reference = family.hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    ours = qoq_jax.generate(family.params, [prompt], max_new_tokens=12, ignore_eos=True)
    assert ours == [reference[0, len(prompt) :].tolist()]


def test_the_test_sequences_run_past_the_sliding_windows(family, rng):
    """Guards the parity tests against windows too wide to matter: transformers' logits change when the same
    weights get a window longer than the test sequences."""
    config = family.hf_model.config
    if config.sliding_window is None:
        assert family.name == "phi4_mini_longrope"
        return
    assert config.sliding_window < min(PROMPT_LENGTHS)
    wide = copy.deepcopy(family.hf_model)
    for layer in wide.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = 1024
    wide.config.sliding_window = 1024
    token_ids = rng.integers(0, config.vocab_size, (1, 40))
    with torch.no_grad():
        wide_logits = wide(torch.tensor(token_ids)).logits.numpy()
    assert relative_error(wide_logits, hf_logits(family, token_ids)) > 1e-3


def test_every_layers_rotary_frequencies_match_transformers(family):
    config, rotary = family.params.config, family.hf_model.model.rotary_emb
    for layer in range(config.num_layers):
        kind = family.hf_model.config.layer_types[layer] if hasattr(rotary, "layer_types") else None
        rope = config.layer_rope(layer)
        if rope.rope_type == "longrope":  # transformers' set for sequences past the original context
            hf_config = family.hf_model.config
            long_context = rope.original_max_position_embeddings + 1
            expected = ROPE_INIT_FUNCTIONS["longrope"](hf_config, None, seq_len=long_context)[0].numpy()
        else:
            expected = getattr(rotary, f"{kind}_original_inv_freq" if kind else "original_inv_freq").numpy()
        ours = inverse_frequencies(rope, config.head_dim)
        np.testing.assert_allclose(ours, expected, rtol=1e-6, err_msg=f"layer {layer}")


def test_longrope_within_its_original_context_uses_the_short_factors(tmp_path, rng):
    hf_model = build_hf_model("phi4_mini_longrope", seed=3, max_position_embeddings=32)
    params = qoq_jax.load(save_hf_model(hf_model, tmp_path), dtype="float32")
    assert not params.config.rope.long_context and params.config.rope.attention_factor == 1.0
    token_ids = rng.integers(0, params.config.vocab_size, (2, 20))
    with torch.no_grad():
        reference = hf_model(torch.tensor(token_ids)).logits.numpy()
    assert relative_error(qoq_jax.forward(params, token_ids), reference) <= LOGITS_RTOL


@pytest.mark.parametrize("family", ["gemma2", "gemma3"], indirect=True)  # the families whose attention differs most
def test_the_engine_serves_what_generate_generates(family, rng):
    """Two requests through the serving engine, one prompt prefilled in two chunks (the chunk attends over the
    cached pages of the first): each output equals `generate` on its prompt alone."""
    prompts = [rng.integers(3, family.params.config.vocab_size, n).tolist() for n in (20, 9)]
    expected = [qoq_jax.generate(family.params, [p], max_new_tokens=6, ignore_eos=True)[0] for p in prompts]
    engine = build_engine(
        family.params, max_num_seqs=2, max_model_len=48, page_size=16, num_pages=8, prefill_row_tokens=16,
        max_num_batched_tokens=32, max_prefill_rows=1, warmup=False,
    )
    for index, prompt in enumerate(prompts):
        engine.add_request(Request(str(index), tuple(prompt), 6, ignore_eos=True))
    tokens = {str(index): [] for index in range(len(prompts))}
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
    assert [tokens[str(index)] for index in range(len(prompts))] == expected
