"""Property-based requests against the running server: schemathesis draws bodies from the app's own OpenAPI
schema, valid ones and ones that break it (wrong types, missing fields, values out of range), and sends each over
real HTTP to the real engine on a tiny model. Whatever arrives: no 5xx, every 4xx in OpenAI's error shape, and
the server healthy afterwards. Bounded for CI: a short context (so any accepted request generates few tokens)
and a fixed number of examples per endpoint, derandomized so a failure reproduces."""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from loopback import serving
from serve.engine import AsyncEngine, build_engine
from serve.http_server import create_app
from tiny_models import sharp_tiny_llama, tiny_tokenizer

MODEL = "tiny-llama"
VOCAB = 320  # the tiny Llama's
FUZZ_OPTIONS = dict(
    max_num_seqs=2,
    max_model_len=64,
    page_size=16,
    num_pages=8,
    max_num_batched_tokens=64,
    prefill_row_tokens=16,
    max_prefill_rows=1,
    warmup="none",
    compile_in_background=False,
)
EXAMPLES = 40  # per operation and mode
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
OPERATIONS = [  # a string path parameter has no invalid values, so the model card is drawn valid only
    *[(method, path, mode) for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
      for mode in (POSITIVE, NEGATIVE)],
    ("GET", "/v1/models/{name}", POSITIVE),
]


@pytest.fixture(scope="module")
def server(gpl_text):
    params = sharp_tiny_llama(tokenizer=tiny_tokenizer(gpl_text))
    app = create_app(AsyncEngine(build_engine(params, model_name=MODEL, **FUZZ_OPTIONS)), model_name=MODEL)
    with serving(app) as url, requests.Session() as session:
        yield app, url, session


# The options the server refuses (with a 400 naming them) pinned to the one value it takes, the model to the
# served name, choices and new tokens to a few and token ids to the vocabulary: so most valid bodies reach the
# engine, while invalid ones (which break these too) still hit every refusal.
PINNED = {
    "model": {"type": "string", "enum": [MODEL]},
    "n": {"type": "integer", "minimum": 1, "maximum": 2},  # a few choices, so the engine's work stays small
    "best_of": {"type": "integer", "minimum": 1, "maximum": 2},
    **{field: {"type": "null"} for field in ("suffix", "tools", "response_format")},
    "max_tokens": {"type": "integer", "minimum": 0, "maximum": 8},  # 0: scoring only (echo), completions
    "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 8},
}


def _ids_in_vocabulary(node):
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node.update(minimum=0, maximum=VOCAB - 1)
        for child in node.values():
            _ids_in_vocabulary(child)
    elif isinstance(node, list):
        for child in node:
            _ids_in_vocabulary(child)


@pytest.fixture(scope="module")
def api_schema(server):
    """The schema the running server publishes, with the pins above."""
    _, url, session = server
    openapi = session.get(f"{url}/openapi.json", timeout=30).json()
    for component in openapi["components"]["schemas"].values():
        properties = component.get("properties", {})
        properties.update({name: pin for name, pin in PINNED.items() if name in properties})
        if "prompt" in properties:
            _ids_in_vocabulary(properties["prompt"])
    return schemathesis.openapi.from_dict(openapi)


@pytest.mark.parametrize("method, path, mode", OPERATIONS, ids=lambda v: getattr(v, "value", v))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_no_request_breaks_the_server(server, api_schema, method, path, mode, data):
    _, url, session = server
    case = data.draw(api_schema[path][method].as_strategy(generation_mode=mode))
    response = case.call(base_url=url, session=session, timeout=60)
    sent = f"{case.method} {case.formatted_path} {case.body!r}"
    assert response.status_code < 500, f"{sent} → {response.status_code} {response.text}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, f"{sent} → {response.text}"
        assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
    elif isinstance(case.body, dict) and case.body.get("stream") is True:
        events = response.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], f"{sent} → {response.text}"
        assert all("error" not in json.loads(e.removeprefix("data: ")) for e in events[:-2]), response.text
    health = session.get(f"{url}/health", timeout=30)
    assert health.status_code == 200, f"unhealthy after {sent}: {health.text}"
