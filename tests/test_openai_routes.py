"""Tier 2: the HTTP layer over a FakeEngine — shapes, errors, queueing, disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.server.generation import Limits
from tests.fakes import FakeEngine, Script, drive_asgi
from tests.polling import wait_until_async

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def sse_payloads(text: str) -> list[Any]:
    out: list[Any] = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- happy paths ------------------------------------------------------------------------------


def test_chat_completion_shape(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "anything"})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt_len = len("<user>Hi<assistant>")
    assert body["usage"]["prompt_tokens"] == prompt_len
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["total_tokens"] == prompt_len + 4
    assert engine.chats == [[{"role": "user", "content": "Hi"}]]


def test_chat_stream_shape(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hello, world!"
    assert "usage" not in chunks[0]


def test_chat_stream_include_usage(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert all(e["usage"] is None for e in events[:-2])


def test_text_completion(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/completions", json={"prompt": ["Once"], "max_tokens": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello, world"
    assert body["choices"][0]["finish_reason"] == "length"
    assert engine.requests[-1].prompt_tokens == [ord(c) for c in "Once"]


def test_text_completion_stream(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "Once", "stream": True,
                                             "stream_options": {"include_usage": True}})
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 4
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "Hello, world!"
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


def test_unknown_keys_and_auth_header_ignored(client: TestClient) -> None:
    body = {**CHAT, "api_type": "llamacpp", "mirostat_mode": 0, "whatever": {"x": 1}}
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer "})
    assert r.status_code == 200


def test_sampling_fields_reach_engine(client: TestClient, engine: FakeEngine) -> None:
    client.post("/v1/chat/completions", json={
        **CHAT, "temperature": 0, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "seed": 42,
        "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.1,
        "stop": "x", "logit_bias": {"15": -100},
    })
    req = engine.requests[-1]
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (0, 0.5, 7, 0.1, 42)
    assert (s.presence_penalty, s.frequency_penalty, s.repeat_penalty) == (0.5, 0.25, 1.1)
    assert s.logit_bias == ((15, -100.0),)
    assert list(req.stop) == ["x"]


def test_content_parts_are_joined(client: TestClient, engine: FakeEngine) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    msg = {"role": "user", "content": parts}
    assert client.post("/v1/chat/completions", json={"messages": [msg]}).status_code == 200
    assert engine.chats[-1][0]["content"] == "ab"


def test_models_and_health(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["fake-model"]
    assert models["data"][0]["object"] == "model"
    assert isinstance(models["data"][0]["created"], int)
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/health").json()["status"] == "ok"


# -- errors -----------------------------------------------------------------------------------

BAD_CHAT = [
    pytest.param(b"{not json", None, id="malformed-json"),
    pytest.param(b"[1, 2]", None, id="array-body"),
    pytest.param(b"", None, id="empty-body"),
    pytest.param({}, "messages", id="messages-missing"),
    pytest.param({"messages": []}, "messages", id="messages-empty"),
    pytest.param({"messages": "hi"}, "messages", id="messages-string"),
    pytest.param({"messages": [{"content": "x"}]}, "messages[0].role", id="role-missing"),
    pytest.param({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role",
                 id="role-unknown"),
    pytest.param({"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
                 id="content-number"),
    pytest.param({"messages": [{"role": "user"}]}, "messages[0]", id="content-missing"),
    pytest.param({**CHAT, "temperature": -0.1}, "temperature", id="temperature-negative"),
    pytest.param({**CHAT, "temperature": "hot"}, "temperature", id="temperature-string"),
    pytest.param({**CHAT, "top_p": 1.5}, "top_p", id="top_p-above-1"),
    pytest.param({**CHAT, "max_tokens": -5}, "max_tokens", id="max_tokens-negative"),
    pytest.param({**CHAT, "n": 2}, "n", id="n-2"),
    pytest.param({**CHAT, "stop": [1, 2]}, "stop", id="stop-numbers"),
    pytest.param({**CHAT, "logit_bias": {"abc": 1}}, "logit_bias", id="logit_bias-key"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                              "image_url": {"url": "x"}}]}]},
                 "messages[0].content", id="image-part"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHAT)
def test_bad_chat_requests_are_400(client: TestClient, body: Any, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/chat/completions", content=content,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    # the server keeps serving
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"prompt": ["a", "b"]}, id="two-prompts"),
        pytest.param({"prompt": 5}, id="prompt-number"),
        pytest.param({}, id="prompt-missing"),
        pytest.param({"prompt": ""}, id="prompt-empty"),
    ],
)
def test_bad_completion_requests_are_400(client: TestClient, body: Any) -> None:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_multipart_body_is_415(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"--x--",
                    headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"


def test_context_length_exceeded(client: TestClient, engine: FakeEngine) -> None:
    n_prompt = len("<user>Hi<assistant>")
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 250, "stream": True})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert str(n_prompt) in err["message"] and "250" in err["message"]
    assert "256" in err["message"]
    assert engine.requests == []
    too_long = {"messages": [{"role": "user", "content": "x" * 300}]}
    r = client.post("/v1/chat/completions", json=too_long)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_max_tokens_ceiling(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine()
    with TestClient(make_app(engine, limits=Limits(max_tokens_limit=2))) as c:
        body = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100}).json()
        assert engine.requests[-1].max_tokens == 2
        assert body["choices"][0]["finish_reason"] == "length"
        c.post("/v1/chat/completions", json=CHAT)
        assert engine.requests[-1].max_tokens == 2


def test_default_max_tokens_fills_the_context(client: TestClient, engine: FakeEngine) -> None:
    client.post("/v1/chat/completions", json=CHAT)
    assert engine.requests[-1].max_tokens == 256 - len("<user>Hi<assistant>")


def test_engine_failure_is_json_500_and_server_keeps_serving(
    client: TestClient, engine: FakeEngine
) -> None:
    engine.script = Script(fail_at=2)
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "scripted failure" in err["message"]
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2]
    engine.script = Script()
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


# -- admission and concurrency ----------------------------------------------------------------


async def test_queue_full_is_503_at_once(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine(parallel=1, script=Script(delay=0.05))
    app = make_app(engine, max_queue=1)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        results = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=CHAT) for _ in range(3))
        )
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 503]
    busy = next(r for r in results if r.status_code == 503)
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "server_busy"
    done = [r.json() for r in results if r.status_code == 200]
    assert all(d["choices"][0]["message"]["content"] == "Hello, world!" for d in done)
    # one was refused before any templating: only two prompts were ever built
    assert len(engine.chats) == 2


async def test_stream_disconnect_cancels_generation(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine(script=Script(tokens=["x"] * 200, delay=0.01))
    app = make_app(engine)
    chunks = await drive_asgi(app, {**CHAT, "stream": True}, disconnect_after=3)
    assert len(chunks) < 10
    await wait_until_async(lambda: engine.cancelled, what="the cancellation")
    assert engine.cancelled == engine.requests
    assert app.state.llmserve.host.admission.in_system == 0


async def test_non_stream_disconnect_cancels_generation(
    make_app: Callable[..., Starlette],
) -> None:
    engine = FakeEngine(script=Script(tokens=["x"] * 200, delay=0.01))
    app = make_app(engine)
    leave = asyncio.Event()
    task = asyncio.create_task(drive_asgi(app, CHAT, disconnect_after=None, disconnect_event=leave))
    await wait_until_async(lambda: engine.started, what="the generation to start")
    leave.set()
    await task
    await wait_until_async(lambda: engine.cancelled, what="the cancellation")
    assert engine.cancelled == engine.requests
    assert app.state.llmserve.host.admission.in_system == 0


async def test_queued_client_that_leaves_never_runs(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine(parallel=1, script=Script(tokens=["x"] * 30, delay=0.01))
    app = make_app(engine, max_queue=2)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        running = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
        await wait_until_async(lambda: engine.started, what="the first request to start")
        leave = asyncio.Event()
        queued = asyncio.create_task(
            drive_asgi(app, {**CHAT, "stream": True}, disconnect_after=None, disconnect_event=leave)
        )
        await wait_until_async(lambda: len(engine.requests) == 2, what="the second to queue")
        leave.set()
        await queued
        first = await running
    assert first.status_code == 200
    assert len(engine.requests) == 2
    assert engine.started == engine.requests[:1]
    assert engine.cancelled == engine.requests[1:]


async def test_health_and_models_answer_while_requests_wait(
    make_app: Callable[..., Starlette],
) -> None:
    # each answer takes 1 s: an event loop blocked by a waiting request would hold these
    # reads at least that long
    engine = FakeEngine(parallel=1, script=Script(tokens=["x"] * 20, delay=0.05))
    app = make_app(engine, max_queue=4)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        busy = [asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
                for _ in range(3)]
        await wait_until_async(lambda: len(engine.requests) == 3, what="three to be admitted")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        health = await c.get("/health")
        models = await c.get("/v1/models")
        elapsed = loop.time() - t0
        assert health.json()["status"] == "ok" and health.json()["queued"] >= 1
        assert models.status_code == 200
        # a behaviour check, not a benchmark: waiting requests must not block the loop (the
        # margin is for a loaded CI machine)
        assert elapsed < 0.5
        await asyncio.gather(*busy)
