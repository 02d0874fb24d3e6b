"""The embedded SmolLM2-135M GGUF: our import and model against transformers loading the same file, float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qoq_jax
from converters.importing import smollm2_path
from tiny_models import smollm2_float32

# One thread: transformers' greedy decoding multiplies one token at a time, where a second OpenMP thread costs
# more than it gives (tenfold per token when the two cores are shared with anything else).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def params():
    return smollm2_float32()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def text_tokens(params, gpl_text):
    tokens = params.tokenizer(gpl_text).input_ids
    assert len(tokens) >= 2048 + 256
    return np.asarray(tokens, np.int32)


def test_config_from_gguf_metadata(params):
    c = params.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.tie_word_embeddings and params.state.get("lm_head") is None
    assert c.eos_token_ids == (2,) and c.rope.theta == 100000.0


def test_tokenizer_matches_transformers_gguf_tokenizer(params, gpl_text):
    from transformers import AutoTokenizer

    path = smollm2_path()
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = params.tokenizer
    assert ours(gpl_text).input_ids == reference(gpl_text).input_ids
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    assert (ours.bos_token_id, ours.eos_token_id, ours.all_special_tokens) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.all_special_tokens,
    )


@pytest.fixture(scope="module")
def text_logits(params, hf_model, text_tokens):
    """(token ids [2, 512], our logits, transformers' logits) on the text's first 1024 tokens: one forward of
    each model, shared by the logits and perplexity tests."""
    token_ids = text_tokens[: 2 * 512].reshape(2, 512)
    with torch.no_grad():
        reference = hf_model(torch.tensor(token_ids, dtype=torch.long)).logits.numpy()
    return token_ids, np.asarray(qoq_jax.forward(params, token_ids)), reference


def test_logits_match_transformers(text_logits):
    _, ours, reference = text_logits
    assert np.max(np.abs(ours - reference)) / np.max(np.abs(reference)) <= 1e-3


def _perplexity(logits, token_ids) -> float:
    logits = logits[:, :-1].astype(np.float64)
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    target = np.take_along_axis(logits, token_ids[:, 1:, None], -1)[..., 0]
    return float(np.exp(np.mean(log_z - target)))


def test_perplexity_matches_transformers(text_logits):
    token_ids, ours, reference = text_logits
    reference, ours = _perplexity(reference, token_ids), _perplexity(ours, token_ids)
    assert abs(ours / reference - 1) <= 0.005
    assert 1.5 < ours < 100  # a real language model on English text, not noise


def test_greedy_32_tokens_match_transformers(params, hf_model):
    prompts = ["The GNU General Public License is", "Free software means"]
    encoded = [params.tokenizer(p).input_ids for p in prompts]
    ours = qoq_jax.complete(params, prompts, max_new_tokens=32, ignore_eos=True)
    for prompt_ids, completion in zip(encoded, ours):
        assert completion.prompt_token_ids == prompt_ids
        with torch.no_grad():
            reference = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False)
        assert completion.token_ids == reference[0, len(prompt_ids) :].tolist()
        assert completion.text == params.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_chat_template_from_gguf(params):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    [completion] = qoq_jax.complete(params, [messages], max_new_tokens=24)
    prompt = params.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.count("<|im_start|>") >= 2
    assert completion.prompt_token_ids == params.tokenizer(prompt, add_special_tokens=False).input_ids
    assert "Paris" in completion.text
