"""Tier 2: llama.cpp's native routes and KoboldCpp's extras over a FakeEngine, replaying the
bodies SillyTavern sends (tests/sillytavern.py)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.server.generation import Limits
from tests import sillytavern as st
from tests.fakes import FakeEngine, Script, drive_asgi
from tests.polling import wait_until_async
from tests.test_openai_routes import sse_payloads

PROMPT = "Once upon a time"


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


# -- /completion ------------------------------------------------------------------------------


def test_completion_non_stream_shape(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/completion", json=st.llamacpp_body(PROMPT, max_tokens=16))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["content"] == "Hello, world!"
    assert body["stop"] is True
    assert body["stop_type"] == "eos" and body["stopping_word"] == ""
    assert body["tokens_evaluated"] == len(PROMPT)
    assert body["tokens_predicted"] == 4
    assert body["model"] == "fake-model"
    assert body["truncated"] is False
    assert {"tokens_cached", "timings"} <= body.keys()
    assert "completion_probabilities" not in body
    settings = body["generation_settings"]
    assert settings["n_ctx"] == 256 and settings["n_predict"] == 16
    assert settings["samplers"] == st.SAMPLERS
    assert engine.requests[-1].prompt_tokens == ids(PROMPT)


def test_completion_maps_every_sillytavern_field(client: TestClient, engine: FakeEngine) -> None:
    body = st.llamacpp_body(
        PROMPT, max_tokens=12, temperature=0.5, dynatemp_range=0.2, dynatemp_exponent=1.5,
        top_k=0, top_p=0.8, min_p=0.1, typical_p=0.95, top_n_sigma=1.5, xtc_probability=0.3,
        xtc_threshold=0.2, repeat_penalty=1.2, repeat_last_n=128, presence_penalty=0.4,
        frequency_penalty=0.3, dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=3,
        dry_penalty_last_n=256, dry_sequence_breakers=["\n", "*"], mirostat=2,
        mirostat_tau=4.0, mirostat_eta=0.2, min_keep=2, seed=7, ignore_eos=True,
        samplers=["dry", "top_k", "temperature"], logit_bias=[[15, -2.5], [16, False]],
        grammar='root ::= "yes"', stop=["A"], stopping_strings=["B", "A"],
    )
    assert client.post("/completion", json=body).status_code == 200
    req = engine.requests[-1]
    s = req.sampling
    assert (s.temperature, s.dynatemp_range, s.dynatemp_exponent) == (0.5, 0.2, 1.5)
    assert (s.top_k, s.top_p, s.min_p, s.typical_p, s.top_n_sigma) == (0, 0.8, 0.1, 0.95, 1.5)
    assert (s.xtc_probability, s.xtc_threshold) == (0.3, 0.2)
    assert (s.repeat_penalty, s.repeat_last_n) == (1.2, 128)
    assert (s.presence_penalty, s.frequency_penalty) == (0.4, 0.3)
    assert (s.dry_multiplier, s.dry_base, s.dry_allowed_length, s.dry_penalty_last_n) == (
        0.8, 2.0, 3, 256)
    assert s.dry_sequence_breakers == ("\n", "*")
    assert (s.mirostat, s.mirostat_tau, s.mirostat_eta, s.min_keep) == (2, 4.0, 0.2, 2)
    assert (s.seed, s.ignore_eos) == (7, True)
    assert s.samplers == ("dry", "top_k", "temperature")
    assert s.logit_bias[0] == (15, -2.5)
    assert s.logit_bias[1][0] == 16 and s.logit_bias[1][1] == -math.inf
    assert s.grammar == 'root ::= "yes"'
    assert list(req.stop) == ["A", "B"]
    assert req.max_tokens == 12


@pytest.mark.parametrize(
    ("alias", "value", "expected"),
    [
        pytest.param("n_predict", 5, 5, id="n_predict"),
        pytest.param("max_tokens", 6, 6, id="max_tokens"),
        pytest.param("max_new_tokens", 7, 7, id="max_new_tokens"),
        pytest.param("num_predict", 8, 8, id="num_predict"),
        pytest.param("n_predict", -1, 256 - len(PROMPT), id="minus-one-fills-context"),
        pytest.param("n_predict", 0, 256 - len(PROMPT), id="zero-fills-context"),
        pytest.param("n_predict", 10_000, 256 - len(PROMPT), id="capped-to-context"),
    ],
)
def test_completion_max_token_aliases(client: TestClient, engine: FakeEngine, alias: str,
                                      value: int, expected: int) -> None:
    r = client.post("/completion", json={"prompt": PROMPT, alias: value})
    assert r.status_code == 200, r.text
    assert engine.requests[-1].max_tokens == expected


def test_completion_leniency(client: TestClient, engine: FakeEngine) -> None:
    body = {"prompt": PROMPT, "stop": "x", "seed": -1, "grammar": "", "logit_bias": [],
            "n": 1, "json_schema": None, "samplers": "kpt", "api_type": "llamacpp",
            "whatever": {"nested": [1]}}
    assert client.post("/completion", json=body).status_code == 200
    req = engine.requests[-1]
    assert list(req.stop) == ["x"]
    assert req.sampling.seed is None and req.sampling.grammar is None
    assert req.sampling.logit_bias == ()
    assert req.sampling.samplers == ("top_k", "top_p", "temperature")
    # object form of logit_bias, and the JSON-text form of dry_sequence_breakers
    body = {"prompt": PROMPT, "logit_bias": {"5": 1.5, "6": False},
            "dry_sequence_breakers": "[\"\\n\", \":\"]"}
    assert client.post("/completion", json=body).status_code == 200
    s = engine.requests[-1].sampling
    assert s.logit_bias[0] == (5, 1.5) and s.logit_bias[1] == (6, -math.inf)
    assert s.dry_sequence_breakers == ("\n", ":")


def test_completion_generation_settings_write_bans_as_false(client: TestClient) -> None:
    body = client.post("/completion", json={"prompt": PROMPT,
                                            "logit_bias": [[9, False]]}).json()
    assert body["generation_settings"]["logit_bias"] == [[9, False]]


def test_completion_stream_shape(client: TestClient) -> None:
    r = client.post("/completion", json=st.llamacpp_body(PROMPT, stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r.text)
    tokens, final = events[:-1], events[-1]
    assert all(e["stop"] is False for e in tokens)
    assert "".join(e["content"] for e in tokens) == "Hello, world!"
    assert final["stop"] is True and final["content"] == ""
    assert final["stop_type"] == "eos"
    assert final["tokens_evaluated"] == len(PROMPT)
    assert {"timings", "stopping_word", "generation_settings"} <= final.keys()


def test_completion_stop_types(client: TestClient) -> None:
    limit = client.post("/completion", json={"prompt": PROMPT, "n_predict": 2}).json()
    assert limit["stop_type"] == "limit" and limit["content"] == "Hello,"
    word = client.post("/completion", json={"prompt": PROMPT, "stop": ["!"]}).json()
    assert word["stop_type"] == "word" and word["stopping_word"] == "!"
    assert word["content"] == "Hello, world"


def test_completion_token_prompt(client: TestClient, engine: FakeEngine) -> None:
    assert client.post("/completion", json={"prompt": [72, 105]}).status_code == 200
    assert engine.requests[-1].prompt_tokens == [72, 105]
    assert client.post("/completion", json={"prompt": [72, "ab", 105]}).status_code == 200
    assert engine.requests[-1].prompt_tokens == [72, 97, 98, 105]


def test_completion_probabilities(client: TestClient, engine: FakeEngine) -> None:
    body = client.post("/completion", json={"prompt": PROMPT, "n_probs": 2}).json()
    assert engine.requests[-1].n_probs == 2
    probs = body["completion_probabilities"]
    assert len(probs) == 4
    first = probs[0]
    assert first["id"] == 0 and first["logprob"] == -0.5
    assert [p["logprob"] for p in first["top_logprobs"]] == [-0.5, -1.5]
    assert {"token", "bytes"} <= first["top_logprobs"][0].keys()
    events = sse_payloads(client.post("/completion", json={"prompt": PROMPT, "n_probs": 1,
                                                            "stream": True}).text)
    assert all(len(e["completion_probabilities"]) == 1 for e in events[:-1])
    assert "completion_probabilities" not in events[-1]
    client.post("/completion", json={"prompt": PROMPT})
    assert engine.requests[-1].n_probs == 0


def test_completion_swipes_return_an_array(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/completion", json={"prompt": PROMPT, "n": 3, "seed": 5})
    assert r.status_code == 200
    swipes = r.json()
    assert isinstance(swipes, list) and len(swipes) == 3
    assert [s["index"] for s in swipes] == [0, 1, 2]
    assert all(s["content"] == "Hello, world!" for s in swipes)
    assert sorted(req.sampling.seed for req in engine.requests) == [5, 6, 7]


BAD_COMPLETION = [
    pytest.param({}, "prompt", id="prompt-missing"),
    pytest.param({"prompt": 5}, "prompt", id="prompt-number"),
    pytest.param({"prompt": []}, "prompt", id="prompt-empty-list"),
    pytest.param({"prompt": ["a", "b"]}, "prompt", id="two-prompts"),
    pytest.param({"prompt": [1, -3]}, "prompt", id="negative-token"),
    pytest.param({"prompt": "x", "n_predict": -2}, "n_predict", id="n_predict-below-minus-1"),
    pytest.param({"prompt": "x", "top_p": 1.5}, "top_p", id="top_p-above-1"),
    pytest.param({"prompt": "x", "mirostat": 3}, "mirostat", id="mirostat-3"),
    pytest.param({"prompt": "x", "temperature": "hot"}, "temperature", id="temperature-text"),
    pytest.param({"prompt": "x", "logit_bias": [[1]]}, "logit_bias", id="logit_bias-not-pair"),
    pytest.param({"prompt": "x", "logit_bias": [["Hello", 1]]}, "logit_bias",
                 id="logit_bias-string-token"),
    pytest.param({"prompt": "x", "logit_bias": [[1, True]]}, "logit_bias",
                 id="logit_bias-true"),
    pytest.param({"prompt": "x", "logit_bias": 3}, "logit_bias", id="logit_bias-number"),
    pytest.param({"prompt": "x", "samplers": [1, 2]}, "samplers", id="samplers-numbers"),
    pytest.param({"prompt": "x", "stop": [1]}, "stop", id="stop-numbers"),
    pytest.param({"prompt": "x", "n_probs": -1}, "n_probs", id="n_probs-negative"),
    pytest.param({"prompt": "x", "n": 0}, "n", id="n-zero"),
    pytest.param({"prompt": "x", "n": 2, "stream": True}, "n", id="swipes-streamed"),
    pytest.param({"prompt": "x", "grammar": "root ::= x", "json_schema": {}}, None,
                 id="grammar-and-schema"),
    pytest.param({"prompt": "x" * 300}, "messages", id="prompt-beyond-context"),
]


@pytest.mark.parametrize(("body", "param"), BAD_COMPLETION)
def test_bad_completion_is_400(client: TestClient, body: dict[str, Any],
                               param: str | None) -> None:
    r = client.post("/completion", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param
    assert client.post("/completion", json={"prompt": "ok"}).status_code == 200


def test_completion_engine_failure(client: TestClient, engine: FakeEngine) -> None:
    engine.script = Script(fail_at=1)
    r = client.post("/completion", json={"prompt": PROMPT})
    assert r.status_code == 500 and "scripted failure" in r.json()["error"]["message"]
    events = sse_payloads(client.post("/completion", json={"prompt": PROMPT,
                                                            "stream": True}).text)
    assert "error" in events[-1]


# -- tokenize / detokenize / template / props / slots -----------------------------------------


def test_tokenize_matches_completion_prompt_tokens(client: TestClient) -> None:
    tokens = client.post("/tokenize", json={"content": PROMPT}).json()["tokens"]
    assert tokens == ids(PROMPT)
    done = client.post("/completion", json={"prompt": PROMPT}).json()
    assert done["tokens_evaluated"] == len(tokens)
    pieces = client.post("/tokenize", json={"content": "ab", "with_pieces": True}).json()
    assert pieces["tokens"] == [{"id": 97, "piece": "a"}, {"id": 98, "piece": "b"}]
    assert client.post("/detokenize", json={"tokens": [104, 105]}).json() == {"content": "hi"}


def test_token_counts_tokenize_like_generation(client: TestClient, engine: FakeEngine,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    tokenize = engine.tokenize

    def spy(text: str, *, add_special: bool = True) -> list[int]:
        calls.append(add_special)
        return tokenize(text, add_special=add_special)

    monkeypatch.setattr(engine, "tokenize", spy)
    client.post("/completion", json={"prompt": "ab"})
    client.post("/tokenize", json={"content": "ab"})
    client.post("/api/extra/tokencount", json={"prompt": "ab"})
    client.post("/api/v1/generate", json={"prompt": "ab"})
    client.post("/tokenize", json={"content": "ab", "add_special": False})
    assert calls == [True, True, True, True, False]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/tokenize", {}, id="tokenize-no-content"),
        pytest.param("/tokenize", {"content": 5}, id="tokenize-number"),
        pytest.param("/tokenize", {"content": "a", "parse_special": False},
                     id="tokenize-parse_special-false"),
        pytest.param("/detokenize", {"tokens": "abc"}, id="detokenize-string"),
        pytest.param("/detokenize", {"tokens": [-1]}, id="detokenize-bad-id"),
        pytest.param("/apply-template", {"messages": []}, id="template-no-messages"),
        pytest.param("/api/extra/tokencount", {}, id="tokencount-no-prompt"),
    ],
)
def test_bad_token_requests_are_400(client: TestClient, path: str, body: dict[str, Any]) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_apply_template(client: TestClient) -> None:
    r = client.post("/apply-template", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.json() == {"prompt": "<user>Hi<assistant>"}


def test_props(client: TestClient) -> None:
    props = client.get("/props").json()
    assert props["chat_template"] == "{{ messages }}"
    assert props["default_generation_settings"]["n_ctx"] == 256
    assert props["total_slots"] == 1
    assert props["model_path"] == "/models/fake-model.gguf"
    assert props["build_info"].startswith("llmserve")
    assert client.get("/props?model=fake-model").status_code == 200


async def test_slots_show_a_running_generation(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine(parallel=2, script=Script(tokens=["x"] * 30, delay=0.01))
    app = make_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        idle = (await c.get("/slots")).json()
        assert [s["is_processing"] for s in idle] == [False, False]
        running = asyncio.create_task(c.post("/completion", json={"prompt": "x",
                                                                  "temperature": 0.3}))
        await wait_until_async(lambda: engine.running, what="the completion to start")
        slots = (await c.get("/slots")).json()
        assert slots[0]["params"]["temperature"] == 0.3
        assert slots[1]["is_processing"] is False
        assert (await running).status_code == 200


def test_no_model_is_503(make_app: Callable[..., Starlette]) -> None:
    with TestClient(make_app(None)) as c:
        for method, path in [("GET", "/props"), ("GET", "/slots"), ("POST", "/tokenize"),
                             ("GET", "/api/v1/model")]:
            r = c.request(method, path, json={"content": "x"})
            assert r.status_code == 503, path
            assert r.json()["error"]["code"] == "no_model"


# -- KoboldCpp --------------------------------------------------------------------------------


def test_kobold_generate(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/api/v1/generate", json=st.kobold_generate_body(PROMPT, max_length=3,
                                                                      memory="M: "))
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["text"] == "Hello, world"
    assert result["finish_reason"] == "length"
    req = engine.requests[-1]
    assert req.prompt_tokens == ids("M: " + PROMPT)
    s = req.sampling
    assert (s.repeat_penalty, s.repeat_last_n, s.typical_p, s.top_k) == (1.1, 320, 1.0, 40)
    assert s.samplers == tuple(st.SAMPLERS)
    assert s.seed is None
    assert list(req.stop) == st.STOPS


@pytest.mark.parametrize(("trim_stop", "text"), [(True, "Hello,"), (False, "Hello, world")])
def test_kobold_trim_stop(client: TestClient, trim_stop: bool, text: str) -> None:
    body = st.kobold_generate_body(PROMPT, stop_sequence=[" world"], trim_stop=trim_stop)
    assert client.post("/api/v1/generate", json=body).json()["results"][0]["text"] == text


def test_kobold_stream(client: TestClient) -> None:
    r = client.post("/api/extra/generate/stream",
                    json=st.kobold_generate_body(PROMPT, stop_sequence=["!"], trim_stop=False))
    blocks = r.text.strip().split("\n\n")
    assert all(b.startswith("event: message\ndata: ") for b in blocks)
    events = [json.loads(b.split("data: ", 1)[1]) for b in blocks]
    assert "".join(e["token"] for e in events) == "Hello, world!"
    assert [e["finish_reason"] for e in events] == [None, None, None, "stop"]


def test_kobold_tokencount_and_info(client: TestClient) -> None:
    r = client.post("/api/extra/tokencount", json={"prompt": "abc"})
    assert r.json() == {"value": 3, "ids": [97, 98, 99]}
    assert client.get("/api/v1/model").json() == {"result": "koboldcpp/fake-model"}
    version = client.get("/api/extra/version").json()
    assert version["result"] == "KoboldCpp" and version["version"]
    assert client.get("/api/v1/config/max_context_length").json() == {"value": 256}
    assert client.get("/api/extra/true_max_context_length").json() == {"value": 256}
    assert client.get("/api/v1/info/version").json()["result"]


def test_koboldcpp_type_body_on_v1_completions(client: TestClient) -> None:
    r = client.post("/v1/completions", json=st.koboldcpp_body(PROMPT))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "Hello, world!"
    r = client.post("/v1/completions", json=st.generic_body(PROMPT))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "Hello, world!"


async def test_abort_by_genkey_and_by_caller(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine(parallel=2, script=Script(tokens=["x"] * 300, delay=0.01))
    app = make_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        keyed = asyncio.create_task(c.post("/api/v1/generate", json=st.kobold_generate_body(
            PROMPT, max_length=200, genkey="KCPP1234")))
        anonymous = asyncio.create_task(c.post("/v1/completions", json=st.koboldcpp_body(
            PROMPT, max_tokens=200)))
        await wait_until_async(
            lambda: len(engine.started) == 2
            and all(engine.emitted.count(r) >= 2 for r in engine.started),
            what="both to generate")
        other = await c.post("/api/extra/abort", json={"genkey": "nobody"})
        assert other.json() == {"success": "false", "done": "false"}
        hit = await c.post("/api/extra/abort", json={"genkey": "KCPP1234"})
        assert hit.json()["success"] == "true"
        text = (await keyed).json()["results"][0]["text"]
        assert 0 < len(text) < 200  # stopped early, the partial text returned
        assert not anonymous.done()
        # SillyTavern's Stop button: no body at all
        assert (await c.post("/api/extra/abort")).json()["success"] == "true"
        done = await anonymous
        assert len(done.json()["choices"][0]["text"]) < 200
    assert len(engine.cancelled) == 2
    assert len(app.state.llmserve.running) == 0
    assert app.state.llmserve.host.admission.in_system == 0


def test_abort_with_bad_body_is_400(client: TestClient) -> None:
    r = client.post("/api/extra/abort", content=b"{oops",
                    headers={"content-type": "application/json"})
    assert r.status_code == 400


async def test_completion_stream_disconnect_cancels(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine(script=Script(tokens=["x"] * 200, delay=0.01))
    app = make_app(engine)
    chunks = await drive_asgi(app, {"prompt": PROMPT, "stream": True},
                              disconnect_after=3, path="/completion")
    assert len(chunks) < 10
    await wait_until_async(lambda: engine.cancelled, what="the cancellation")
    assert engine.cancelled == engine.requests
    assert app.state.llmserve.host.admission.in_system == 0


@pytest.mark.parametrize(
    ("path", "body", "started"),
    [
        pytest.param("/completion", {"prompt": PROMPT, "n": 2}, 2, id="completion-swipes"),
        pytest.param("/api/v1/generate", {"prompt": PROMPT}, 1, id="kobold-generate"),
        # two slots: the third prompt never starts
        pytest.param("/generate/batch", {"prompts": ["a", "b", "c"]}, 2, id="seed-batch"),
    ],
)
async def test_non_stream_disconnect_cancels(make_app: Callable[..., Starlette], path: str,
                                             body: dict[str, Any], started: int) -> None:
    engine = FakeEngine(parallel=2, script=Script(tokens=["x"] * 200, delay=0.01))
    app = make_app(engine)
    leave = asyncio.Event()
    task = asyncio.create_task(drive_asgi(app, body, disconnect_after=None, path=path,
                                           disconnect_event=leave))
    await wait_until_async(lambda: len(engine.started) == started, what="the generations")
    leave.set()
    await task
    await wait_until_async(lambda: len(engine.cancelled) == len(engine.requests) == started,
                           what="every generation to be cancelled")
    assert len(engine.requests) == started
    # the batch's generations are cancelled in whatever order their tasks unwind
    assert sorted(map(id, engine.cancelled)) == sorted(map(id, engine.requests))
    assert app.state.llmserve.host.admission.in_system == 0
    assert len(app.state.llmserve.running) == 0


def test_ceiling_applies(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine()
    with TestClient(make_app(engine, limits=Limits(max_tokens_limit=2))) as c:
        assert c.post("/completion", json={"prompt": "x", "n_predict": -1}).json()[
            "content"] == "Hello,"
        assert engine.requests[-1].max_tokens == 2
        assert c.get("/api/v1/config/max_length").json() == {"value": 2}


def test_sse_frames_are_json(client: TestClient) -> None:
    raw = client.post("/completion", json={"prompt": PROMPT, "stream": True}).text
    for block in raw.strip().split("\n\n"):
        json.loads(block.removeprefix("data: "))
