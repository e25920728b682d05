"""OpenAI logprobs and ``n`` choices through params and the routes, with the FakeEngine; the
shapes are checked against the openai SDK's own response types. The real engine's forking and
values: tests/test_choices_real.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import openai.types
import openai.types.chat
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.errors import InvalidRequest
from llmserve.params import Wire, normalise
from tests.fakes import FakeEngine
from tests.test_observability import samples, value
from tests.test_openai_routes import sse_payloads

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}
TEXT = {"prompt": "Hi"}


def openai_params(values: dict[str, Any]) -> Any:
    return normalise(Wire("openai", values, {k: k for k in values}))


# -- params --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "logprobs", "n_probs"), [
    pytest.param({}, None, 0, id="not-asked"),
    pytest.param({"logprobs": False}, None, 0, id="chat-false"),
    pytest.param({"logprobs": False, "top_logprobs": 0}, None, 0, id="chat-false-top-0"),
    pytest.param({"logprobs": True}, 0, 1, id="chat-true"),
    pytest.param({"logprobs": True, "top_logprobs": 5}, 5, 5, id="chat-top-5"),
    pytest.param({"logprobs": True, "top_logprobs": 20}, 20, 20, id="chat-top-20"),
    pytest.param({"logprobs": 0}, 0, 1, id="completions-0"),
    pytest.param({"logprobs": 3}, 3, 3, id="completions-3"),
])
def test_logprobs_ask_the_engine_for_n_probs(
    values: dict[str, Any], logprobs: int | None, n_probs: int
) -> None:
    p = openai_params(values)
    assert (p.logprobs, p.n_probs) == (logprobs, n_probs)


@pytest.mark.parametrize(("values", "param"), [
    pytest.param({"logprobs": True, "top_logprobs": 21}, "top_logprobs", id="top-21"),
    pytest.param({"logprobs": True, "top_logprobs": -1}, "top_logprobs", id="top-negative"),
    pytest.param({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs", id="top-fraction"),
    pytest.param({"logprobs": True, "top_logprobs": "5"}, "top_logprobs", id="top-string"),
    pytest.param({"top_logprobs": 3}, "top_logprobs", id="top-without-logprobs"),
    pytest.param({"logprobs": False, "top_logprobs": 3}, "top_logprobs", id="top-logprobs-false"),
    pytest.param({"logprobs": 21}, "logprobs", id="completions-21"),
    pytest.param({"logprobs": "yes"}, "logprobs", id="logprobs-string"),
    pytest.param({"n": 0}, "n", id="n-0"),
    pytest.param({"n": -2}, "n", id="n-negative"),
    pytest.param({"n": 1.5}, "n", id="n-fraction"),
    pytest.param({"n": True}, "n", id="n-bool"),
])
def test_bad_logprobs_and_n_name_the_field(values: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        openai_params(values)
    assert err.value.param == param and err.value.status == 400


# -- routes --------------------------------------------------------------------------------------


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(parallel=3)


@pytest.fixture
def client(make_app: Callable[..., Starlette], engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(make_app(engine), raise_server_exceptions=False) as c:
        yield c


def test_chat_logprobs_match_the_sdk_types(client: TestClient) -> None:
    r = client.post("/v1/chat/completions",
                    json={**CHAT, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    body = openai.types.chat.ChatCompletion.model_validate(r.json())
    logprobs = body.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == ["\x00", "\x01", "\x02", "\x03"]
    first = logprobs.content[0]
    # FakeEngine scripts the token at -0.5 and runners-up at -1.5, -2.5, ...
    assert first.logprob == -0.5 and first.bytes == [0]
    assert [t.logprob for t in first.top_logprobs] == [-0.5, -1.5]
    assert body.choices[0].message.content == "Hello, world!"


def test_chat_logprobs_without_top_have_empty_alternatives(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True})
    content = openai.types.chat.ChatCompletion.model_validate(r.json()).choices[0].logprobs
    assert content is not None and content.content is not None
    assert all(t.top_logprobs == [] for t in content.content)


def test_no_logprobs_unless_asked(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "logprobs": False})
    assert r.json()["choices"][0]["logprobs"] is None
    assert engine.requests[-1].n_probs == 0


def test_completions_logprobs_match_the_sdk_types(client: TestClient) -> None:
    r = client.post("/v1/completions", json={**TEXT, "logprobs": 2, "echo": True})
    assert r.status_code == 200, r.text
    body = openai.types.Completion.model_validate(r.json())
    logprobs = body.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["\x00", "\x01", "\x02", "\x03"]
    assert logprobs.token_logprobs == [-0.5] * 4
    assert logprobs.text_offset == [2, 3, 4, 5]  # after the echoed prompt "Hi"
    assert logprobs.top_logprobs is not None and len(logprobs.top_logprobs[0]) == 2


def test_streamed_chat_logprobs_match_the_sdk_types(client: TestClient) -> None:
    r = client.post("/v1/chat/completions",
                    json={**CHAT, "logprobs": True, "top_logprobs": 3, "stream": True})
    chunks = [openai.types.chat.ChatCompletionChunk.model_validate(c)
              for c in sse_payloads(r.text)[:-1]]
    with_probs = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert len(with_probs) == 4  # one per token
    assert all(p.content is not None and len(p.content[0].top_logprobs) == 3
               for p in with_probs)


def test_streamed_completions_logprobs_match_the_sdk_types(client: TestClient) -> None:
    # The SDK reads text_completion chunks with its Completion type, which (unlike OpenAI's
    # stream) types finish_reason as never null: the logprobs part is validated on its own.
    r = client.post("/v1/completions", json={**TEXT, "logprobs": 3, "stream": True})
    chunks = [c for c in sse_payloads(r.text)[:-1] if c["choices"][0]["logprobs"]]
    probs = [openai.types.completion_choice.Logprobs.model_validate(c["choices"][0]["logprobs"])
             for c in chunks]
    assert [p.text_offset for p in probs] == [[0], [1], [2], [3]]
    assert [p.tokens for p in probs] == [["\x00"], ["\x01"], ["\x02"], ["\x03"]]


@pytest.mark.parametrize(("path", "body", "text"), [
    pytest.param("/v1/chat/completions", CHAT, lambda c: c["message"]["content"], id="chat"),
    pytest.param("/v1/completions", TEXT, lambda c: c["text"], id="completions"),
])
def test_n_returns_indexed_choices_and_counts_them_all(
    client: TestClient, engine: FakeEngine, path: str, body: dict[str, Any],
    text: Callable[[dict[str, Any]], str],
) -> None:
    r = client.post(path, json={**body, "n": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [text(c) for c in out["choices"]] == ["Hello, world!"] * 3
    assert out["usage"]["completion_tokens"] == 12  # 4 tokens in each choice
    assert out["usage"]["prompt_tokens"] == len(engine.requests[0].prompt_tokens)
    assert len(engine.requests) == 3


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_n_interleaves_choices_then_one_usage(client: TestClient, path: str) -> None:
    body = CHAT if "chat" in path else TEXT
    r = client.post(path, json={**body, "n": 3, "stream": True,
                                "stream_options": {"include_usage": True}})
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    usage = payloads[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    texts: dict[int, str] = {}
    finished: list[int] = []
    for chunk in payloads[:-2]:
        (choice,) = chunk["choices"]
        part = choice["delta"].get("content") if "delta" in choice else choice["text"]
        texts[choice["index"]] = texts.get(choice["index"], "") + (part or "")
        if choice["finish_reason"] is not None:
            finished.append(choice["index"])
    assert texts == {i: "Hello, world!" for i in range(3)}
    assert sorted(finished) == [0, 1, 2]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_n_above_parallel_is_400_before_any_token(
    client: TestClient, engine: FakeEngine, path: str, stream: bool
) -> None:
    body = CHAT if "chat" in path else TEXT
    r = client.post(path, json={**body, "n": 4, "stream": stream})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "n" and "--parallel" in error["message"]
    assert engine.requests == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_choices_with_a_seed_get_seed_plus_index(
    client: TestClient, engine: FakeEngine, path: str
) -> None:
    body = CHAT if "chat" in path else TEXT
    client.post(path, json={**body, "n": 3, "seed": 7})
    assert [r.sampling.seed for r in engine.requests] == [7, 8, 9]


def test_bad_top_logprobs_is_400_on_the_route(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions",
                    content=json.dumps({**CHAT, "logprobs": True, "top_logprobs": 21}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "top_logprobs"
    assert engine.requests == []


@pytest.mark.parametrize("stream", [False, True])
def test_metrics_count_every_choices_tokens(
    make_app: Callable[..., Starlette], stream: bool
) -> None:
    engine = FakeEngine(parallel=3)
    with TestClient(make_app(engine), raise_server_exceptions=False) as c:
        assert c.post("/v1/completions", json={**TEXT, "n": 3, "stream": stream}
                      ).status_code == 200
        metrics = c.app.state.llmserve.metrics.exposition().decode()  # type: ignore[attr-defined]
    m = samples(metrics)
    assert value(m, "llmserve_completion_tokens_total", model="fake-model") == 12
    assert value(m, "llmserve_prompt_tokens_total", model="fake-model") == 2  # the prompt once
