"""Tier 2: the seed's native routes (/generate, /chat, /generate/batch) over a FakeEngine —
defaults, every parameter, streaming, and the {"detail": ...} error rendering."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.errors import (
    ContextLengthExceeded,
    EngineError,
    InvalidRequest,
    LlmserveError,
    RateLimited,
    ServerBusy,
)
from llmserve.server.errors import error_response
from llmserve.server.generation import Limits
from tests.fakes import FakeEngine, Script
from tests.polling import wait_until_async

CHAT = [{"role": "user", "content": "Hi"}]


def test_generate_defaults(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/generate", json={"prompt": "Once"})
    assert r.status_code == 200, r.text
    assert r.json() == {"response": "Hello, world!",
                        "usage": {"prompt_tokens": 4, "completion_tokens": 4,
                                  "total_tokens": 8}}
    req = engine.requests[-1]
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.repeat_penalty, s.min_p) == (
        0.7, 0.9, 80, 1.15, 0.0)
    assert req.max_tokens == 256 - 4  # the room left in the context


def test_generate_every_parameter(client: TestClient, engine: FakeEngine) -> None:
    body = {"prompt": "Once", "model_id": "fake-model", "stream": False, "max_length": 3,
            "temperature": 0.2, "top_p": 0.5, "top_k": 7, "repetition_penalty": 1.3,
            "do_sample": True, "seed": 11, "stop": "!", "unknown": 1}
    r = client.post("/generate", json=body)
    assert r.json()["response"] == "Hello, world"
    req = engine.requests[-1]
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.repeat_penalty, s.seed) == (0.2, 0.5, 7, 1.3, 11)
    assert req.max_tokens == 3 and list(req.stop) == ["!"]


@pytest.mark.parametrize(
    ("max_length", "expected"),
    [pytest.param(-1, 252, id="minus-one"), pytest.param(0, 252, id="zero"),
     pytest.param(None, 252, id="omitted"), pytest.param(5000, 252, id="capped"),
     pytest.param(9, 9, id="given")],
)
def test_max_length(client: TestClient, engine: FakeEngine, max_length: int | None,
                    expected: int) -> None:
    body: dict[str, Any] = {"prompt": "Once"}
    if max_length is not None:
        body["max_length"] = max_length
    assert client.post("/generate", json=body).status_code == 200
    assert engine.requests[-1].max_tokens == expected


def test_server_ceiling(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine()
    with TestClient(make_app(engine, limits=Limits(max_tokens_limit=2))) as c:
        assert c.post("/generate", json={"prompt": "x"}).json()["response"] == "Hello,"
        assert engine.requests[-1].max_tokens == 2


def test_do_sample_false_is_greedy(client: TestClient, engine: FakeEngine) -> None:
    client.post("/generate", json={"prompt": "x", "do_sample": False, "temperature": 0.9})
    assert engine.requests[-1].sampling.temperature == 0.0


def test_generate_stream(client: TestClient) -> None:
    r = client.post("/generate", json={"prompt": "x", "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text == ("data: Hello\n\ndata: ,\n\ndata:  world\n\ndata: !\n\n"
                      "data: [DONE]\n\n")


def test_stream_splits_newlines_into_data_lines(client: TestClient,
                                                 engine: FakeEngine) -> None:
    engine.script = Script(tokens=["a\nb"])
    r = client.post("/generate", json={"prompt": "x", "stream": True})
    assert r.text == "data: a\ndata: b\n\ndata: [DONE]\n\n"


def test_stream_failure_is_an_error_event(client: TestClient, engine: FakeEngine) -> None:
    engine.script = Script(fail_at=1)
    r = client.post("/generate", json={"prompt": "x", "stream": True})
    assert r.text.startswith("data: Hello\n\nevent: error\ndata: {\"detail\":")
    assert r.text.endswith("data: [DONE]\n\n")


def test_chat(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/chat", json={"messages": CHAT, "max_length": 2})
    assert r.json() == {
        "choices": [{"message": {"role": "assistant", "content": "Hello,"},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": len("<user>Hi<assistant>"), "completion_tokens": 2,
                  "total_tokens": len("<user>Hi<assistant>") + 2},
    }
    assert engine.chats[-1] == CHAT
    streamed = client.post("/chat", json={"messages": CHAT, "stream": True}).text
    assert streamed.endswith("data: !\n\ndata: [DONE]\n\n")


async def test_batch_runs_concurrently_in_order(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine(parallel=2, script=Script(delay=0.02))
    app = make_app(engine, max_queue=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        prompts = ["a", "bb", "ccc", "dddd"]
        r = await c.post("/generate/batch", json={"prompts": prompts, "max_length": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["responses"] == ["Hello,"] * 4
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}
    # in input order, and never more than the slots at once (a queue of 0 still admits all)
    assert sorted(len(req.prompt_tokens) for req in engine.requests) == [1, 2, 3, 4]


def test_batch_results_follow_input_order(client: TestClient, engine: FakeEngine) -> None:
    body = client.post("/generate/batch", json={"prompts": ["a", "b"], "max_length": 1}).json()
    assert body["responses"] == ["Hello", "Hello"]
    assert [r.prompt_tokens for r in engine.requests] == [[97], [98]]


# -- errors: {"detail": ...} with the seed's statuses -----------------------------------------

BAD = [
    pytest.param("/generate", b"{nope", 400, id="generate-bad-json"),
    pytest.param("/generate", {}, 400, id="generate-no-prompt"),
    pytest.param("/generate", {"prompt": ""}, 400, id="generate-empty-prompt"),
    pytest.param("/generate", {"prompt": 5}, 400, id="generate-prompt-number"),
    pytest.param("/generate", {"prompt": "x", "temperature": -1}, 400, id="temperature-neg"),
    pytest.param("/generate", {"prompt": "x", "top_p": 1.5}, 400, id="top_p-above-1"),
    pytest.param("/generate", {"prompt": "x", "top_k": -2}, 400, id="top_k-neg"),
    pytest.param("/generate", {"prompt": "x", "repetition_penalty": 0}, 400, id="rep-pen-0"),
    pytest.param("/generate", {"prompt": "x", "max_length": -2}, 400, id="max_length-neg"),
    pytest.param("/generate", {"prompt": "x", "do_sample": "maybe"}, 400, id="do_sample-text"),
    pytest.param("/generate", {"prompt": "x" * 300}, 413, id="generate-too-long"),
    pytest.param("/chat", {}, 400, id="chat-no-messages"),
    pytest.param("/chat", {"messages": []}, 400, id="chat-empty-messages"),
    pytest.param("/chat", {"messages": [{"role": "x", "content": "y"}]}, 400, id="chat-role"),
    pytest.param("/chat", {"messages": [{"role": "user", "content": "x" * 300}]}, 413,
                 id="chat-too-long"),
    pytest.param("/generate/batch", {}, 400, id="batch-no-prompts"),
    pytest.param("/generate/batch", {"prompts": []}, 400, id="batch-empty"),
    pytest.param("/generate/batch", {"prompts": ["a", ""]}, 400, id="batch-empty-prompt"),
    pytest.param("/generate/batch", {"prompts": ["a"] * 65}, 400, id="batch-too-many"),
    pytest.param("/generate/batch", {"prompts": ["a"], "stream": True}, 400,
                 id="batch-stream"),
    pytest.param("/generate/batch", {"prompts": ["a", "x" * 300]}, 413, id="batch-too-long"),
]


@pytest.mark.parametrize(("path", "body", "status"), BAD)
def test_bad_input_gets_detail(client: TestClient, path: str, body: Any, status: int) -> None:
    content = body if isinstance(body, bytes) else None
    r = (client.post(path, content=content, headers={"content-type": "application/json"})
         if content is not None else client.post(path, json=body))
    assert r.status_code == status, r.text
    payload = r.json()
    assert list(payload) == ["detail"] and isinstance(payload["detail"], str)
    assert payload["detail"]
    assert client.post("/generate", json={"prompt": "ok"}).status_code == 200


def test_engine_failure_is_500_detail(client: TestClient, engine: FakeEngine) -> None:
    engine.script = Script(fail_at=0)
    r = client.post("/generate", json={"prompt": "x"})
    assert r.status_code == 500 and "scripted failure" in r.json()["detail"]


def test_method_not_allowed_is_detail(client: TestClient) -> None:
    r = client.get("/generate")
    assert r.status_code == 405 and "detail" in r.json()


def test_no_model_is_503_detail(make_app: Callable[..., Starlette]) -> None:
    with TestClient(make_app(None)) as c:
        r = c.post("/generate", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert set(r.json()) == {"detail"}


async def test_busy_is_503_detail(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine(parallel=1, script=Script(delay=0.05))
    app = make_app(engine, max_queue=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        first = asyncio.create_task(c.post("/generate", json={"prompt": "x"}))
        await wait_until_async(lambda: engine.requests, what="the first to be admitted")
        busy = await c.post("/generate", json={"prompt": "x"})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "busy" in busy.json()["detail"]
        assert (await first).status_code == 200


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        pytest.param(RateLimited("slow down", retry_after=2.5), 429, id="rate-limited"),
        pytest.param(ContextLengthExceeded(300, 0, 256), 413, id="too-long"),
        pytest.param(ServerBusy("busy"), 503, id="busy"),
        pytest.param(EngineError("boom"), 500, id="engine"),
        pytest.param(InvalidRequest("bad", param="x"), 400, id="invalid"),
    ],
)
def test_detail_rendering_of_the_one_tree(exc: LlmserveError, status: int) -> None:
    detail = error_response(exc, "detail")
    assert detail.status_code == status
    assert json.loads(detail.body) == {"detail": exc.message}
    openai_style = error_response(exc)
    assert json.loads(openai_style.body)["error"]["message"] == exc.message
    assert openai_style.status_code == (400 if status == 413 else status)
    assert detail.headers.get("retry-after") == openai_style.headers.get("retry-after")
    if isinstance(exc, RateLimited):
        assert detail.headers["retry-after"] == "3"


def test_openai_routes_keep_their_envelope(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "x" * 300})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": -5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
