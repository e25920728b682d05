"""Tier 2: the multi-model registry with FakeEngine loaders — JIT, LRU, safe swap, failed loads,
keep-alive — and the model endpoints built on it."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.config import ModelSpec
from llmserve.errors import ModelFailed, ModelLoadError, ModelLoading, ModelNotFound
from llmserve.registry import KEEP, ModelHost
from tests.conftest import requires_llama_cpp
from tests.fakes import FakeClock, FakeEngine, Script
from tests.polling import wait_until, wait_until_async

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def spec(model_id: str, **kw: object) -> ModelSpec:
    return ModelSpec(id=model_id, path=Path(f"/models/{model_id}.gguf"), **kw)  # type: ignore[arg-type]


class FakeLoader:
    """Makes a FakeEngine per load; ``fail`` ids raise like a corrupt GGUF; ``gate`` holds every
    load until set."""

    def __init__(self, fail: frozenset[str] = frozenset(), script: Script | None = None) -> None:
        self.fail = fail
        self.script = script
        self.gate: threading.Event | None = None
        self.loads: list[str] = []
        self.engines: list[FakeEngine] = []

    def __call__(self, s: ModelSpec) -> FakeEngine:
        if self.gate is not None:
            assert self.gate.wait(10)
        self.loads.append(s.id)
        if s.id in self.fail:
            raise ModelLoadError(f"llama.cpp could not load {s.path}", param="model")
        engine = FakeEngine(model_id=s.id)
        if self.script is not None:
            engine.script = self.script
        self.engines.append(engine)
        return engine

    def engine(self, model_id: str) -> FakeEngine:
        return [e for e in self.engines if e.info.id == model_id][-1]


def host_with(*ids: str, loader: FakeLoader | None = None, **kw: object) -> ModelHost:
    return ModelHost(loader or FakeLoader(), max_queue=4, specs=[spec(i) for i in ids],
                     **kw)  # type: ignore[arg-type]


async def test_jit_loads_and_lru_unloads_first() -> None:
    loader = FakeLoader()
    host = host_with("a", "b", loader=loader)
    lease = await host.acquire("a")
    assert lease.engine.info.id == "a"
    lease.release()
    lease = await host.acquire("b")
    assert lease.engine.info.id == "b"
    lease.release()
    assert loader.loads == ["a", "b"]
    assert loader.engine("a").closed and not loader.engine("b").closed
    assert {s.spec.id: s.state for s in host.statuses()} == {"a": "not-loaded", "b": "loaded"}
    await host.close()
    assert loader.engine("b").closed


async def test_least_recently_used_goes_first() -> None:
    loader = FakeLoader()
    host = host_with("a", "b", "c", loader=loader, max_loaded_models=2)
    for model in ("a", "b", "a", "c"):
        (await host.acquire(model)).release()
    assert loader.engine("b").closed and not loader.engine("a").closed
    assert [s.spec.id for s in host.statuses() if s.state == "loaded"] == ["a", "c"]


async def test_idle_model_is_evicted_before_a_busy_one() -> None:
    loader = FakeLoader()
    host = host_with("a", "b", "c", loader=loader, max_loaded_models=2)
    busy = await host.acquire("a")  # least recently used, but in use
    (await host.acquire("b")).release()
    (await host.acquire("c")).release()
    assert loader.engine("b").closed and not loader.engine("a").closed
    busy.release()


async def test_swap_waits_for_in_flight_requests() -> None:
    loader = FakeLoader()
    host = host_with("a", "b", loader=loader)
    lease_a = await host.acquire("a")
    swap = asyncio.ensure_future(host.acquire("b"))
    await wait_until_async(lambda: host.loading == ["b"], what="the swap to begin")
    # b waits for a's memory: a is out of service at once, closed after its request
    assert [s.state for s in host.statuses()] == ["not-loaded", "loading"]
    assert not swap.done() and not loader.engine("a").closed
    assert loader.loads == ["a"]
    lease_a.release()
    lease_b = await asyncio.wait_for(swap, 5)
    assert loader.engine("a").closed and lease_b.engine.info.id == "b"
    lease_b.release()


async def test_requests_for_a_loading_model_get_503() -> None:
    loader = FakeLoader()
    loader.gate = threading.Event()
    host = host_with("a", "b", loader=loader)
    first = asyncio.ensure_future(host.acquire("a"))
    await wait_until_async(lambda: host.loading, what="the load to begin")
    assert host.state == "loading" and host.loading == ["a"]
    with pytest.raises(ModelLoading):
        await host.acquire("a")
    with pytest.raises(ModelLoading):
        host.borrow("a")
    loader.gate.set()
    (await asyncio.wait_for(first, 5)).release()
    assert host.state == "ready"


async def test_failed_load_puts_back_what_it_unloaded() -> None:
    loader = FakeLoader(fail=frozenset({"bad"}))
    host = host_with("a", "bad", loader=loader)
    (await host.acquire("a")).release()
    with pytest.raises(ModelLoadError):
        await host.acquire("bad")
    assert loader.loads == ["a", "bad", "a"]
    lease = await host.acquire("a")  # serving again
    assert lease.engine.info.id == "a"
    lease.release()


async def test_failed_check_unloads_nothing() -> None:
    loader = FakeLoader()

    def check(s: ModelSpec) -> None:
        if s.id == "bad":
            raise ModelLoadError("bad.gguf is truncated", param="model")

    host = host_with("a", "bad", loader=loader, check=check)
    (await host.acquire("a")).release()
    with pytest.raises(ModelLoadError, match="truncated"):
        await host.load("bad")
    assert loader.loads == ["a"] and not loader.engine("a").closed


async def test_names() -> None:
    host = ModelHost(FakeLoader(), max_queue=1, specs=[spec("a", aliases=["gpt-4o"]), spec("b")])
    assert host.resolve("gpt-4o").id == "a"
    assert host.resolve(None).id == "a"  # nothing loaded: the first known
    with pytest.raises(ModelNotFound, match="known models: a, b"):
        host.resolve("c")
    single = ModelHost(FakeLoader(), max_queue=1, specs=[spec("only")])
    assert single.resolve("whatever SillyTavern sends").id == "only"
    with pytest.raises(ModelNotFound):
        single.lookup("whatever")


async def test_caller_that_leaves_mid_load_does_not_leak_the_model() -> None:
    loader = FakeLoader()
    loader.gate = threading.Event()
    host = host_with("a", "b", loader=loader)
    waiting = asyncio.ensure_future(host.acquire("a"))
    await wait_until_async(lambda: host.loading, what="the load to begin")
    waiting.cancel()
    loader.gate.set()
    await wait_until_async(lambda: host.state == "ready", what="the load to finish")
    assert host.statuses()[0].in_flight == 0
    (await host.acquire("b")).release()  # a is idle, so it can be unloaded
    assert loader.engine("a").closed


# -- keep-alive (an injected clock: no test sleeps through a TTL) --------------------------------


def clocked_host(ttl: float | None, loader: FakeLoader | None = None
                 ) -> tuple[ModelHost, FakeClock, FakeLoader]:
    loader = loader or FakeLoader()
    clock = FakeClock()
    host = ModelHost(loader, max_queue=1, specs=[spec("a", ttl=ttl)], clock=clock)
    return host, clock, loader


async def test_ttl_unloads_an_idle_model_and_the_next_request_reloads_it() -> None:
    host, clock, loader = clocked_host(ttl=60)
    (await host.acquire("a")).release()
    status = host.statuses()[0]
    assert status.state == "loaded" and status.expires_at == clock.time() + 60
    clock.advance(59.9)
    assert host.statuses()[0].state == "loaded"
    clock.advance(0.1)
    assert host.statuses()[0].state == "not-loaded"  # out of service at once
    await wait_until_async(lambda: loader.engine("a").closed, what="the engine to close")
    (await host.acquire("a")).release()
    assert loader.loads == ["a", "a"]


async def test_ttl_counts_from_the_end_of_the_last_request() -> None:
    host, clock, _ = clocked_host(ttl=60)
    lease = await host.acquire("a")
    clock.advance(600)
    assert host.statuses()[0].state == "loaded"  # busy: never unloaded
    lease.release()
    clock.advance(59)
    assert host.statuses()[0].state == "loaded"
    clock.advance(1)
    assert host.statuses()[0].state == "not-loaded"


@pytest.mark.parametrize("keep_alive, loaded_after", [(0.0, False), (None, True), (KEEP, True)],
                         ids=["zero-unloads-after-the-request", "negative-is-forever",
                              "unset-keeps-the-config"])
async def test_request_keep_alive(keep_alive: object, loaded_after: bool) -> None:
    host, clock, _ = clocked_host(ttl=None)
    (await host.acquire("a", keep_alive)).release()
    clock.advance(10**6)
    assert (host.statuses()[0].state == "loaded") is loaded_after


# -- a busy model's unload stalls nobody -------------------------------------------------------


async def test_unloading_a_busy_model_does_not_block_loading_another() -> None:
    loader = FakeLoader()
    host = host_with("a", "b", loader=loader, max_loaded_models=2)
    busy = await host.acquire("a")
    unloading = asyncio.ensure_future(host.unload("a"))
    await wait_until_async(lambda: host.statuses()[0].state == "not-loaded",
                           what="a to leave service")
    # b loads and serves while a still finishes its request (its unload waits for it)
    lease_b = await asyncio.wait_for(host.acquire("b"), 5)
    assert lease_b.engine.info.id == "b" and not unloading.done()
    assert not loader.engine("a").closed
    lease_b.release()
    busy.release()
    assert await asyncio.wait_for(unloading, 5) is True
    assert loader.engine("a").closed and not loader.engine("b").closed


async def test_unloading_a_busy_model_does_not_delay_another_models_ttl() -> None:
    loader = FakeLoader()
    clock = FakeClock()
    host = ModelHost(loader, max_queue=1, specs=[spec("a"), spec("b", ttl=30)],
                     max_loaded_models=2, clock=clock)
    busy = await host.acquire("a")
    (await host.acquire("b")).release()
    unloading = asyncio.ensure_future(host.unload("a"))
    await wait_until_async(lambda: host.statuses()[0].state == "not-loaded",
                           what="a to leave service")
    clock.advance(30)
    await wait_until_async(lambda: loader.engine("b").closed, what="b's idle unload")
    assert not unloading.done() and not loader.engine("a").closed
    busy.release()
    await asyncio.wait_for(unloading, 5)
    assert loader.engine("a").closed


# -- a dead engine ------------------------------------------------------------------------------


async def test_a_dead_engine_fails_its_model_and_the_next_request_reloads_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loader = FakeLoader()
    host = host_with("a", "b", loader=loader, max_loaded_models=2)
    (await host.acquire("a")).release()
    (await host.acquire("b")).release()
    dead = loader.engine("a")
    dead.kill(RuntimeError("GGML_ASSERT(n_tokens <= n_batch) failed"))
    with caplog.at_level(logging.ERROR, logger="llmserve.registry"):
        assert [(s.spec.id, s.failed) for s in host.statuses()] == [("a", True), ("b", False)]
        with pytest.raises(ModelFailed) as exc:
            await host.acquire("a")
        assert "GGML" not in exc.value.message  # the cause goes to the log only
        with pytest.raises(ModelLoading):  # the reload the failed request started
            host.current("a")
        lease_b = await host.acquire("b")  # the other model serves throughout
        lease_b.release()
        await wait_until_async(lambda: host.state == "ready" and not host.loading,
                               what="the reload")
    lease = await host.acquire("a")
    assert lease.engine is not dead and lease.engine.failure is None
    lease.release()
    assert dead.closed and loader.loads == ["a", "b", "a"]
    causes = [r for r in caplog.records if "GGML_ASSERT" in r.getMessage()]
    assert len(causes) == 1 and causes[0].exc_info is not None  # logged once, with its cause


async def test_loading_a_failed_model_loads_it_afresh() -> None:
    loader = FakeLoader()
    host = host_with("a", loader=loader)
    first = await host.load("a")
    loader.engine("a").kill()
    second = await host.load("a")
    assert second is not first and second.failure is None
    await wait_until_async(lambda: loader.engines[0].closed, what="the dead engine to close")


# -- over HTTP ----------------------------------------------------------------------------------


@pytest.fixture
def two_models(make_app: Callable[..., Starlette]) -> tuple[TestClient, FakeLoader]:
    loader = FakeLoader(fail=frozenset({"corrupt"}))
    app = make_app(loader=loader, specs=[spec("a", aliases=["alpha"]), spec("b"),
                                         spec("corrupt")])
    return TestClient(app, raise_server_exceptions=False), loader


def test_chat_names_the_model_and_jit_loads_it(two_models: tuple[TestClient, FakeLoader]
                                               ) -> None:
    client, loader = two_models
    with client:
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "no_model", "models": [], "slots_busy": 0, "queued": 0}
        r = client.post("/v1/chat/completions", json={**CHAT, "model": "alpha"})
        assert r.status_code == 200 and r.json()["model"] == "a"
        r = client.post("/v1/completions", json={"prompt": "x", "model": "b"})
        assert r.status_code == 200 and r.json()["model"] == "b"
        assert loader.engine("a").closed
        assert client.get("/health").json()["models"] == [
            {"id": "b", "state": "ready", "slots": 1, "slots_busy": 0, "queued": 0}]
        r = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-5"})
        assert r.status_code == 404
        error = r.json()["error"]
        assert error["code"] == "model_not_found" and "a, b, corrupt" in error["message"]


def test_failed_jit_load_is_a_clear_400_and_the_old_model_keeps_serving(
    two_models: tuple[TestClient, FakeLoader],
) -> None:
    client, _ = two_models
    with client:
        assert client.post("/v1/chat/completions", json={**CHAT, "model": "a"}).status_code == 200
        r = client.post("/v1/chat/completions", json={**CHAT, "model": "corrupt"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_load_failed"
        r = client.post("/v1/chat/completions", json={**CHAT, "model": "a"})
        assert r.status_code == 200


def test_model_listings(two_models: tuple[TestClient, FakeLoader]) -> None:
    client, _ = two_models
    with client:
        client.post("/v1/models/load", json={"model": "b"})
        data = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["state"]) for m in data] == [
            ("a", "not-loaded"), ("b", "loaded"), ("corrupt", "not-loaded")]
        # /models/... are fake paths: the listing says why their metadata is missing
        assert all("not found" in m["error"] for m in data)
        assert data[0]["aliases"] == ["alpha"] and data[1]["n_ctx"] == 256
        assert client.get("/models/available").json()["data"] == data
        assert [m["id"] for m in client.get("/models/current").json()["data"]] == ["b"]
        assert client.get("/v1/models/alpha").json()["id"] == "a"
        lm = client.get("/api/v0/models").json()["data"]
        assert [(m["id"], m["state"], m["type"]) for m in lm] == [
            ("a", "not-loaded", "llm"), ("b", "loaded", "llm"), ("corrupt", "not-loaded", "llm")]
        assert lm[1]["loaded_context_length"] == 256
        assert client.get("/api/v0/models/b").json()["state"] == "loaded"
        r = client.get("/api/v0/models/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        ps = client.get("/api/ps").json()["models"]
        assert [m["name"] for m in ps] == ["b"]
        assert ps[0]["expires_at"] == "9999-12-31T23:59:59Z"  # no ttl: never


def test_load_and_unload_by_id(two_models: tuple[TestClient, FakeLoader]) -> None:
    client, loader = two_models
    with client:
        r = client.post("/models/load", json={"id": "a"})
        assert r.status_code == 200 and r.json()["model"]["state"] == "loaded"
        r = client.post("/v1/models/load", json={"model": "corrupt"})
        assert r.status_code == 400 and "could not load" in r.json()["error"]["message"]
        assert [m["id"] for m in client.get("/health").json()["models"]] == ["a"]
        r = client.post("/v1/models/load", json={"model": "nope"})
        assert r.status_code == 404
        r = client.post("/v1/models/unload", json={"model": "b"})
        assert r.json() == {"status": "no_model"}
        r = client.post("/models/unload", json={"model": "alpha"})
        assert r.json() == {"status": "unloaded"} and loader.engine("a").closed
        r = client.post("/v1/models/unload", json={"model": "nope"})
        assert r.status_code == 404


def test_keep_alive_in_the_request(two_models: tuple[TestClient, FakeLoader]) -> None:
    client, loader = two_models
    with client:
        r = client.post("/v1/chat/completions", json={**CHAT, "model": "a", "keep_alive": 0})
        assert r.status_code == 200
        wait_until(lambda: loader.engine("a").closed, what="the keep_alive 0 unload")
        r = client.post("/v1/chat/completions", json={**CHAT, "model": "a", "ttl": 600})
        ps = client.get("/api/ps").json()["models"]
        assert ps[0]["expires_at"] != "9999-12-31T23:59:59Z"
        r = client.post("/v1/chat/completions", json={**CHAT, "model": "a", "keep_alive": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"


def test_model_sampling_defaults_fill_only_unset_fields(make_app: Callable[..., Starlette]
                                                        ) -> None:
    loader = FakeLoader()
    app = make_app(loader=loader, specs=[spec("a", sampling={"temperature": 0.1, "top_k": 5})])
    with TestClient(app) as client:
        client.post("/v1/chat/completions", json={**CHAT, "temperature": 0.8})
        client.post("/v1/chat/completions", json={**CHAT, "temperature": None})
    first, second = (r.sampling for r in loader.engine("a").requests)
    assert (first.temperature, first.top_k) == (0.8, 5)
    assert (second.temperature, second.top_k) == (0.1, 5)


@requires_llama_cpp  # the llama.cpp build it reports
def test_system_info(client: TestClient) -> None:
    body = client.get("/system/info").json()
    assert body["os"]["system"] and body["cpu"]["cores"] >= 1
    assert body["ram"]["total_bytes"] > 0
    assert isinstance(body["gpus"], list)
    assert body["versions"]["llmserve"] and body["versions"]["llama_cpp_python"]
    build = body["llama_cpp"]
    assert isinstance(build["gpu_offload"], bool)
    assert "CPU" in build["backends"]
    assert build["system_info"].startswith("CPU")


def test_nvidia_smi_output_is_parsed() -> None:
    from llmserve.system_info import parse_smi_csv

    gpus = parse_smi_csv("0, NVIDIA H100 80GB HBM3, 81559, 80000, 550.54.15\n")
    assert gpus == [{"index": 0, "name": "NVIDIA H100 80GB HBM3",
                     "memory_total_bytes": 81559 * 2**20, "memory_free_bytes": 80000 * 2**20,
                     "driver": "550.54.15", "source": "nvidia-smi"}]


async def test_health_says_loading_while_the_only_model_loads(
    make_app: Callable[..., Starlette],
) -> None:
    loader = FakeLoader()
    loader.gate = threading.Event()
    app = make_app(loader=loader, specs=[spec("a")])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        chat = asyncio.ensure_future(c.post("/v1/chat/completions", json=CHAT))
        host = app.state.llmserve.host
        await wait_until_async(lambda: host.loading, what="the load to begin")
        health = await c.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "loading", "models": [{"id": "a", "state": "loading"}],
                                 "slots_busy": 0, "queued": 0}
        busy = await c.post("/v1/chat/completions", json=CHAT)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "model_loading"
        loader.gate.set()
        assert (await asyncio.wait_for(chat, 5)).status_code == 200


# -- over HTTP: two models measured alike; a dead engine is seen ---------------------------------


def test_metrics_and_health_show_every_loaded_model(make_app: Callable[..., Starlette]) -> None:
    from tests.test_observability import samples, value

    loader = FakeLoader()
    app = make_app(loader=loader, specs=[spec("a"), spec("b")], max_loaded_models=2)
    with TestClient(app) as client:
        for model in ("a", "b"):
            assert client.post("/v1/completions",
                               json={"prompt": "x", "model": model}).status_code == 200
        m = samples(client.get("/metrics").text)
        assert value(m, "llmserve_loaded_models") == 2
        for name in ("llmserve_slots", "llmserve_slots_busy", "llmserve_queue_depth",
                     "llmserve_model_load_seconds", "llmserve_model_failed"):
            assert {labels for n, labels in m if n == name} == {
                (("model", "a"),), (("model", "b"),)}, name
        assert value(m, "llmserve_slots", model="b") == 1
        health = client.get("/health").json()
        assert health["status"] == "ok"
        assert [(h["id"], h["state"]) for h in health["models"]] == [("a", "ready"),
                                                                      ("b", "ready")]


def test_an_engine_lost_for_good_stays_failed_and_health_says_why(
    make_app: Callable[..., Starlette],
) -> None:
    loader = FakeLoader()
    app = make_app(loader=loader, specs=[spec("a")])
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        why = "RPC server 127.0.0.1:50052 stopped answering; restart llmserve"
        loader.engine("a").kill(ModelFailed(why, retry_after=30.0))
        for _ in range(2):  # no reload: a request gets the same answer every time
            r = client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 503 and r.headers["retry-after"] == "30"
            assert r.json()["error"]["code"] == "model_failed"
            assert r.json()["error"]["message"] == why
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json()["models"][0] == {
                "id": "a", "state": "failed", "error": why, "slots": 1, "slots_busy": 0,
                "queued": 0}
        assert loader.loads == ["a"]


def test_a_dead_engine_is_503_model_failed_and_health_names_it_until_reloaded(
    make_app: Callable[..., Starlette], caplog: pytest.LogCaptureFixture,
) -> None:
    loader = FakeLoader()
    app = make_app(loader=loader, specs=[spec("a"), spec("b")], max_loaded_models=2)
    with TestClient(app, raise_server_exceptions=False) as client:
        for model in ("a", "b"):
            assert client.post("/v1/chat/completions",
                               json={**CHAT, "model": model}).status_code == 200
        loader.engine("a").kill(RuntimeError("GGML_ASSERT(secret llama.cpp detail) failed"))
        health = client.get("/health")
        assert health.status_code == 503 and "retry-after" in health.headers
        body = health.json()
        assert body["status"] == "failed" and body["failed"] == ["a"]
        assert [(h["id"], h["state"]) for h in body["models"]] == [("a", "failed"),
                                                                    ("b", "ready")]
        r = client.post("/v1/chat/completions", json={**CHAT, "model": "a"})
        assert r.status_code == 503 and "retry-after" in r.headers
        error = r.json()["error"]
        assert error["code"] == "model_failed" and "model a " in error["message"]
        assert "GGML" not in r.text
        # b never stopped serving; a comes back on its own, reloaded by that request
        assert client.post("/v1/chat/completions",
                           json={**CHAT, "model": "b"}).status_code == 200

        def both_ready() -> bool:
            health = client.get("/health")
            return health.status_code == 200 and [
                (m["id"], m["state"]) for m in health.json()["models"]] == [("a", "ready"),
                                                                             ("b", "ready")]

        wait_until(both_ready, what="a's reload")
        r = client.post("/v1/chat/completions", json={**CHAT, "model": "a"})
        assert r.status_code == 200 and r.json()["model"] == "a"
    assert loader.loads == ["a", "b", "a"] and loader.engines[0].closed
    assert len([r for r in caplog.records if "secret llama.cpp detail" in r.getMessage()]) == 1


def test_a_stream_in_flight_when_the_engine_dies_ends_with_an_error_event(
    make_app: Callable[..., Starlette],
) -> None:
    engine = FakeEngine(script=Script(tokens=("tok",) * 200, delay=0.01))
    app = make_app(engine)
    with TestClient(app, raise_server_exceptions=False) as client, client.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
    ) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        engine.kill()
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"
    assert '"error"' in rest[-2] and "GGML" not in rest[-2]


def test_post_load_reloads_a_failed_model(two_models: tuple[TestClient, FakeLoader]) -> None:
    client, loader = two_models
    with client:
        assert client.post("/v1/models/load", json={"model": "a"}).status_code == 200
        loader.engine("a").kill()
        assert client.get("/health").status_code == 503
        r = client.post("/v1/models/load", json={"model": "a"})
        assert r.status_code == 200 and r.json()["model"]["state"] == "loaded"
        assert client.get("/health").status_code == 200
        assert loader.loads == ["a", "a"]
