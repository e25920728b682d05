"""Tier 2: loading and unloading models while requests run (ModelHost's guarantees)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import httpx
from starlette.applications import Starlette

from llmserve.config import ModelSpec
from llmserve.errors import ModelLoadError
from tests.fakes import FakeEngine, Script
from tests.polling import wait_until_async

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


async def test_swap_waits_for_in_flight_and_503s_while_loading(
    make_app: Callable[..., Starlette],
) -> None:
    old = FakeEngine(model_id="old", script=Script(tokens=["x"] * 20, delay=0.02))
    release_load = threading.Event()
    new = FakeEngine(model_id="new")

    def loader(spec: ModelSpec) -> FakeEngine:
        release_load.wait(5)
        return new

    app = make_app(old, loader=loader)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        running = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
        await wait_until_async(lambda: old.started, what="the request on the old model")
        load = asyncio.create_task(c.post("/v1/models/load", json={"model": "/m/new.gguf"}))
        host = app.state.llmserve.host
        await wait_until_async(lambda: host.loading == ["new"], what="the load to begin")
        health = await c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        busy = await c.post("/v1/chat/completions", json=CHAT)
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == "model_loading"
        assert "retry-after" in busy.headers
        release_load.set()
        first = await running
        loaded = await load
    # the request that was running when the load began finished in full on the old model
    assert first.status_code == 200
    assert first.json()["choices"][0]["message"]["content"] == "x" * 20
    assert loaded.status_code == 200 and loaded.json()["model"]["id"] == "new"
    assert old.closed and not new.closed
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.json()["model"] == "new"


async def test_failed_load_keeps_the_old_model(make_app: Callable[..., Starlette]) -> None:
    old = FakeEngine(model_id="old")

    def loader(spec: ModelSpec) -> FakeEngine:
        if spec.id == "old":  # reloading the model that was unloaded to make room
            return old
        raise ModelLoadError(f"llama.cpp could not load {spec.path}", param="model")

    app = make_app(old, loader=loader)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        r = await c.post("/v1/models/load", json={"model": "/m/broken.gguf"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "model_load_failed"
        assert (await c.get("/health")).json()["status"] == "ok"
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.json()["model"] == "old"


async def test_unload_then_no_model(make_app: Callable[..., Starlette]) -> None:
    engine = FakeEngine()
    reloads: list[ModelSpec] = []

    def loader(spec: ModelSpec) -> FakeEngine:
        reloads.append(spec)
        return FakeEngine()

    app = make_app(engine, loader=loader)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        assert (await c.post("/v1/models/unload")).json()["status"] == "unloaded"
        assert engine.closed
        health = await c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "no_model"
        assert [m["state"] for m in (await c.get("/v1/models")).json()["data"]] == ["not-loaded"]
        assert (await c.post("/v1/models/unload")).json()["status"] == "no_model"
        # a request naming the known model loads it again (LM Studio's just-in-time loading)
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        assert [s.id for s in reloads] == ["fake-model"]
