"""Graceful shutdown: the Drain refuses new requests and lets (or makes) in-flight ones end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from starlette.applications import Starlette

from llmserve.server.shutdown import Drain
from tests.fakes import FakeEngine, Script
from tests.polling import wait_until_async

CHAT = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture
async def app_client(
    make_app: Callable[..., Starlette],
) -> AsyncIterator[tuple[FakeEngine, Drain, httpx.AsyncClient]]:
    engine = FakeEngine(parallel=2, script=Script(tokens=("tok",) * 10, delay=0.03))
    app = make_app(engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield engine, app.state.llmserve.drain, client


def events(body: str) -> list[str]:
    return [line[6:] for line in body.splitlines() if line.startswith("data: ")]


async def started(engine: FakeEngine, n: int) -> None:
    await wait_until_async(lambda: len(engine.started) >= n, what=f"{n} generations to start")


async def test_drain_refuses_new_requests_and_lets_streams_finish(
    app_client: tuple[FakeEngine, Drain, httpx.AsyncClient],
) -> None:
    engine, drain, client = app_client
    streams = [asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
               for _ in range(2)]
    await started(engine, 2)
    draining = asyncio.create_task(drain.run(timeout=10))
    await asyncio.sleep(0)
    assert drain.draining and drain.in_flight == 2
    for path in ("/v1/chat/completions", "/v1/models"):
        refused = await client.request("POST" if "chat" in path else "GET", path, json=CHAT)
        assert refused.status_code == 503, path
        assert refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"] == "5"
    # a load balancer polling /health learns at once that this replica is going away
    for path in ("/health", "/v1/health"):
        health = await client.get(path)
        assert health.status_code == 503, path
        assert health.json()["status"] == "draining"
        assert health.headers["retry-after"] == "5"
    for r in await asyncio.gather(*streams):
        data = events(r.text)
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["choices"][0]["finish_reason"] == "stop"
        assert "".join(json.loads(d)["choices"][0]["delta"].get("content", "")
                       for d in data[:-1]) == "tok" * 10
    await asyncio.wait_for(draining, 5)
    assert drain.in_flight == 0 and engine.cancelled == []


async def test_drain_timeout_ends_running_generations_with_an_error(
    app_client: tuple[FakeEngine, Drain, httpx.AsyncClient],
) -> None:
    engine, drain, client = app_client
    engine.script = Script(tokens=("tok",) * 1000, delay=0.01)  # ten seconds each
    stream = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    plain = asyncio.create_task(client.post("/v1/chat/completions",
                                            json={**CHAT, "stream": False}))
    await started(engine, 2)
    await asyncio.wait_for(drain.run(timeout=0.2), 5)
    assert drain.in_flight == 0
    data = events((await stream).text)
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["code"] == "shutting_down" and "shutdown timeout (0.2 s)" in error["message"]
    answer = await plain
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "shutting_down"
    await wait_until_async(lambda: len(engine.cancelled) == 2, what="the engine to stop both")


async def test_drain_with_nothing_in_flight_returns_at_once() -> None:
    drain = Drain()
    await asyncio.wait_for(drain.run(timeout=30), 1)
    assert drain.draining
