"""Tier 2: the OpenAI routes map every sampling field (and SillyTavern's aliases) onto
SamplingParams, and refuse bad values with a 400 naming the parameter."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from starlette.testclient import TestClient

from llmserve.engine.sampling import VocabFacts, plan_chain
from llmserve.engine.types import SamplingParams
from tests.conftest import requires_llama_cpp
from tests.fakes import FakeEngine

MESSAGES = [{"role": "user", "content": "Hi"}]
ORDER = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
         "temperature"]

# SillyTavern's Text Completion → llama.cpp payload (CLIENTS.md), every sampler switched on,
# plus the keys it sends that are not ours.
SILLYTAVERN = {
    "stream": False, "n_predict": 16, "max_tokens": 16, "max_new_tokens": 16, "num_predict": 16,
    "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "typical_p": 0.95,
    "repeat_penalty": 1.1, "repeat_last_n": 128, "presence_penalty": 0.1,
    "frequency_penalty": 0.2, "mirostat": 0, "mirostat_tau": 5, "mirostat_eta": 0.1,
    "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 256,
    "dry_sequence_breakers": ["\n", ":", "\"", "*"], "xtc_threshold": 0.1,
    "xtc_probability": 0.5, "top_n_sigma": 2.0, "min_keep": 1, "samplers": ORDER,
    "stop": ["\n\n"], "stopping_strings": ["\n\n"], "ignore_eos": False, "grammar": "",
    "logit_bias": [[15, -1.0], [16, False]], "seed": 42, "n_probs": 0, "cache_prompt": True,
    "n": 1, "dynatemp_range": 0.2, "dynatemp_exponent": 1.5,
    "api_type": "llamacpp", "api_server": "http://127.0.0.1:8080", "truncation_length": 2048,
}

EXPECTED = SamplingParams(
    temperature=0.7, dynatemp_range=0.2, dynatemp_exponent=1.5, top_k=20, top_p=0.9, min_p=0.05,
    typical_p=0.95, top_n_sigma=2.0, xtc_probability=0.5, xtc_threshold=0.1, repeat_penalty=1.1,
    repeat_last_n=128, presence_penalty=0.1, frequency_penalty=0.2, dry_multiplier=0.8,
    dry_base=1.75, dry_allowed_length=2, dry_penalty_last_n=256,
    dry_sequence_breakers=("\n", ":", "\"", "*"), mirostat=0, mirostat_tau=5.0, mirostat_eta=0.1,
    min_keep=1, seed=42, logit_bias=((15, -1.0), (16, -math.inf)), ignore_eos=False,
    samplers=tuple(ORDER), grammar=None, json_schema=None,
)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/v1/completions", {"prompt": "Once upon a time"}, id="completions"),
        pytest.param("/v1/chat/completions", {"messages": MESSAGES}, id="chat"),
    ],
)
def test_sillytavern_llama_cpp_payload_is_accepted_in_full(
    client: TestClient, engine: FakeEngine, path: str, body: dict[str, Any]
) -> None:
    r = client.post(path, json={**SILLYTAVERN, **body})
    assert r.status_code == 200, r.text
    sampling = engine.requests[-1].sampling
    assert sampling == EXPECTED
    plan = plan_chain(sampling, vocab=VocabFacts(n_vocab=100, n_ctx=256))
    assert plan.names == ["logit_bias", "penalties", "dry", "top_n_sigma", "top_k", "typical",
                          "top_p", "min_p", "xtc", "temp_ext", "dist"]


@pytest.mark.parametrize(
    ("extra", "field", "value"),
    [
        pytest.param({"repetition_penalty": 1.3}, "repeat_penalty", 1.3, id="repetition_penalty"),
        pytest.param({"rep_pen": 1.2}, "repeat_penalty", 1.2, id="rep_pen"),
        pytest.param({"typical": 0.8}, "typical_p", 0.8, id="typical"),
        pytest.param({"logit_bias": {"15": -100, "16": False}}, "logit_bias",
                     ((15, -100.0), (16, -math.inf)), id="logit_bias-object"),
        pytest.param({"logit_bias": []}, "logit_bias", (), id="logit_bias-empty-list"),
        pytest.param({"samplers": "kt"}, "samplers", ("top_k", "temperature"),
                     id="samplers-letters"),
        pytest.param({"samplers": "top_k"}, "samplers", ("top_k",), id="samplers-one-name"),
        pytest.param({"dry_sequence_breakers": '["\\n", "User:"]'}, "dry_sequence_breakers",
                     ("\n", "User:"), id="dry_sequence_breakers-json-string"),
        # any other string is one breaker, as llama-server reads it
        pytest.param({"dry_sequence_breakers": "User:"}, "dry_sequence_breakers",
                     ("User:",), id="dry_sequence_breakers-one-string"),
        pytest.param({"ignore_eos": True}, "ignore_eos", True, id="ignore_eos"),
        pytest.param({"seed": -1}, "seed", None, id="seed-random"),
        pytest.param({"top_k": -1}, "top_k", 0, id="top_k-minus-1-off"),
        pytest.param({"grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"', id="grammar"),
        pytest.param({"grammar": ""}, "grammar", None, id="grammar-empty"),
    ],
)
def test_aliases_and_forms_map_to_sampling_params(
    client: TestClient, engine: FakeEngine, extra: dict[str, Any], field: str, value: Any
) -> None:
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, **extra})
    assert r.status_code == 200, r.text
    assert getattr(engine.requests[-1].sampling, field) == value


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"json_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
                     id="json_schema", marks=requires_llama_cpp),
        pytest.param({"response_format": {"type": "json_object"}}, id="json_object",
                     marks=requires_llama_cpp),
        pytest.param({"response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "strict": True,
            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}},
            id="response_format-json_schema", marks=requires_llama_cpp),
    ],
)
def test_json_schemas_reach_the_engine_as_a_grammar(
    client: TestClient, engine: FakeEngine, extra: dict[str, Any]
) -> None:
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, **extra})
    assert r.status_code == 200, r.text
    sampling = engine.requests[-1].sampling
    assert sampling.grammar is not None and "root ::=" in sampling.grammar
    assert sampling.json_schema is None


def test_response_format_text_is_no_constraint(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions",
                    json={"messages": MESSAGES, "response_format": {"type": "text"}})
    assert r.status_code == 200
    assert engine.requests[-1].sampling.grammar is None


BAD = [
    pytest.param({"temperature": -1}, "temperature", id="temperature-negative"),
    pytest.param({"dynatemp_range": -0.1}, "dynatemp_range", id="dynatemp_range-negative"),
    pytest.param({"dynatemp_exponent": -1}, "dynatemp_exponent", id="dynatemp_exponent-neg"),
    pytest.param({"top_k": -2}, "top_k", id="top_k-below-minus-1"),
    pytest.param({"top_p": 1.01}, "top_p", id="top_p-above-1"),
    pytest.param({"min_p": -0.1}, "min_p", id="min_p-negative"),
    pytest.param({"typical_p": 1.5}, "typical_p", id="typical_p-above-1"),
    pytest.param({"typical": 2}, "typical", id="typical-alias-above-1"),
    pytest.param({"top_n_sigma": "x"}, "top_n_sigma", id="top_n_sigma-string"),
    pytest.param({"xtc_probability": 1.5}, "xtc_probability", id="xtc_probability-above-1"),
    pytest.param({"xtc_threshold": -0.1}, "xtc_threshold", id="xtc_threshold-negative"),
    pytest.param({"repeat_penalty": 0}, "repeat_penalty", id="repeat_penalty-0"),
    pytest.param({"repetition_penalty": -1}, "repetition_penalty", id="repetition_penalty-neg"),
    pytest.param({"repeat_last_n": -2}, "repeat_last_n", id="repeat_last_n-below-minus-1"),
    pytest.param({"presence_penalty": 3}, "presence_penalty", id="presence_penalty-above-2"),
    pytest.param({"frequency_penalty": -3}, "frequency_penalty", id="frequency_penalty-below"),
    pytest.param({"dry_multiplier": -1}, "dry_multiplier", id="dry_multiplier-negative"),
    pytest.param({"dry_base": 0.5}, "dry_base", id="dry_base-below-1"),
    pytest.param({"dry_allowed_length": -1}, "dry_allowed_length", id="dry_allowed_length-neg"),
    pytest.param({"dry_penalty_last_n": -2}, "dry_penalty_last_n", id="dry_penalty_last_n-neg"),
    pytest.param({"dry_sequence_breakers": [1, 2]}, "dry_sequence_breakers",
                 id="dry_sequence_breakers-numbers"),
    pytest.param({"mirostat": 3}, "mirostat", id="mirostat-3"),
    pytest.param({"mirostat_tau": -1}, "mirostat_tau", id="mirostat_tau-negative"),
    pytest.param({"mirostat_eta": -1}, "mirostat_eta", id="mirostat_eta-negative"),
    pytest.param({"min_keep": -1}, "min_keep", id="min_keep-negative"),
    pytest.param({"dry_allowed_length": 2**31}, "dry_allowed_length",
                 id="dry_allowed_length-past-int32"),
    pytest.param({"seed": 1.5}, "seed", id="seed-float"),
    pytest.param({"ignore_eos": "maybe"}, "ignore_eos", id="ignore_eos-string"),
    pytest.param({"samplers": ["top_k", "magic"]}, "samplers", id="samplers-unknown"),
    pytest.param({"samplers": [1]}, "samplers", id="samplers-number"),
    pytest.param({"logit_bias": "x"}, "logit_bias", id="logit_bias-string"),
    pytest.param({"logit_bias": [[15, "x"]]}, "logit_bias", id="logit_bias-string-bias"),
    pytest.param({"logit_bias": {"abc": 1}}, "logit_bias", id="logit_bias-key"),
    pytest.param({"logit_bias": {"15": True}}, "logit_bias", id="logit_bias-true"),
    pytest.param({"logit_bias": [[15]]}, "logit_bias", id="logit_bias-short-pair"),
    pytest.param({"logit_bias": [["15", 1]]}, "logit_bias", id="logit_bias-string-id"),
    pytest.param({"logit_bias": {"99999999": 1}}, "logit_bias", id="logit_bias-past-vocab"),
    pytest.param({"grammar": 5}, "grammar", id="grammar-number"),
    pytest.param({"grammar": 'root ::= "a"', "json_schema": {}}, "grammar",
                 id="grammar-and-json_schema"),
    pytest.param({"json_schema": "{}"}, "json_schema", id="json_schema-string"),
    pytest.param({"json_schema": {"type": "nonsense"}}, "json_schema", id="json_schema-bad",
                 marks=requires_llama_cpp),
    pytest.param({"response_format": {"type": "xml"}}, "response_format.type",
                 id="response_format-type"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format",
        id="response_format-bad-schema", marks=requires_llama_cpp),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_bad_sampling_values_are_400_naming_the_parameter(
    client: TestClient, engine: FakeEngine, path: str, extra: dict[str, Any], param: str
) -> None:
    body = {"messages": MESSAGES} if "chat" in path else {"prompt": "Hi"}
    r = client.post(path, json={**body, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert param.split(".")[0].split("[")[0] in err["message"]
    assert not engine.requests, "a bad request reached the engine"


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400(client: TestClient, raw: str) -> None:
    content = '{"messages": [{"role": "user", "content": "Hi"}], "temperature": ' + raw + "}"
    r = client.post("/v1/chat/completions", content=content,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "temperature"


def test_non_finite_logit_bias_is_400(client: TestClient) -> None:
    content = '{"messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"5": NaN}}'
    r = client.post("/v1/chat/completions", content=content,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "logit_bias"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_the_last_streamed_chunk_carries_timings(client: TestClient, path: str) -> None:
    body = {"messages": MESSAGES} if "chat" in path else {"prompt": "Hi"}
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["timings"]["predicted_n"] == 4
    assert all("timings" not in e for e in events if e is not finals[0])
