"""/metrics (Prometheus text) and the access log (tier 2)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.server.access import JsonFormatter
from llmserve.server.options import ServerOptions
from llmserve.server.ratelimit import RateLimit
from tests.fakes import FakeEngine, Script
from tests.polling import wait_until_async

CHAT = {"model": "x", "messages": [{"role": "user", "content": "the secret word is zebra"}]}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_rejections_and_tokens(
    make_app: Callable[..., Starlette]
) -> None:
    engine = FakeEngine(script=Script(tokens=("a", "b", "c", "d")))
    options = ServerOptions(api_keys=("sk",), rate_limit=RateLimit(1, 60.0, burst=4),
                            max_body_size=2000)
    client = TestClient(make_app(engine, options=options), raise_server_exceptions=False)
    key = {"x-api-key": "sk"}
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream}, headers=key)
        assert r.status_code == 200
    assert client.post("/v1/completions", json={"model": "x", "prompt": "12345"},
                       headers=key).status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.post("/v1/completions", headers=key, json={"prompt": "x" * 3000}
                       ).status_code == 413
    assert client.get("/v1/models", headers=key).status_code == 429  # 5th keyed request
    # the bucket is empty now, and /metrics is a keyed route like any other: read it directly
    m = samples(client.app.state.llmserve.metrics.exposition().decode())  # type: ignore[attr-defined]
    route = "/v1/chat/completions"
    assert value(m, "llmserve_requests_total", route=route, status="200") == 2
    assert value(m, "llmserve_requests_total", route="/v1/completions", status="200") == 1
    assert value(m, "llmserve_requests_total", route="/v1/models", status="401") == 1
    assert value(m, "llmserve_requests_total", route="/v1/completions", status="413") == 1
    assert value(m, "llmserve_requests_total", route="/v1/models", status="429") == 1
    assert value(m, "llmserve_rejections_total", reason="auth") == 1
    assert value(m, "llmserve_rejections_total", reason="too_large") == 1
    assert value(m, "llmserve_rejections_total", reason="rate_limit") == 1
    assert value(m, "llmserve_rejections_total", reason="queue_full") == 0
    chat_prompt = len("<user>the secret word is zebra<assistant>")
    assert value(m, "llmserve_prompt_tokens_total", model="fake-model") == 2 * chat_prompt + 5
    assert value(m, "llmserve_completion_tokens_total", model="fake-model") == 12
    assert value(m, "llmserve_time_to_first_token_seconds_count", model="fake-model") == 3
    assert value(m, "llmserve_tokens_per_second_count", model="fake-model") == 3
    assert value(m, "llmserve_loaded_models") == 1
    assert value(m, "llmserve_slots", model="fake-model") == 1
    assert value(m, "llmserve_slots_busy", model="fake-model") == 0
    assert value(m, "llmserve_queue_depth", model="fake-model") == 0
    assert m[("llmserve_model_failed", (("model", "fake-model"),))] == 0
    assert ("llmserve_model_load_seconds", (("model", "fake-model"),)) in m


def test_metrics_endpoint_serves_prometheus_text(make_app: Callable[..., Starlette]) -> None:
    client = TestClient(make_app(FakeEngine()), raise_server_exceptions=False)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    first = client.get("/metrics")
    assert first.status_code == 200
    assert first.headers["content-type"].startswith("text/plain; version=")
    m = samples(client.get("/metrics").text)
    assert value(m, "llmserve_requests_total", route="/v1/chat/completions", status="200") == 1
    assert value(m, "llmserve_requests_total", route="/metrics", status="200") == 1
    # every app has its own registry: a fresh app starts from zero
    other = TestClient(make_app(FakeEngine()), raise_server_exceptions=False)
    m = samples(other.get("/metrics").text)
    assert value(m, "llmserve_requests_total", route="/v1/chat/completions", status="200") == 0


def test_instance_name_labels_every_sample(make_app: Callable[..., Starlette]) -> None:
    client = TestClient(make_app(FakeEngine(), options=ServerOptions(instance_name="gpu-1")),
                        raise_server_exceptions=False)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    families = list(text_string_to_metric_families(client.get("/metrics").text))
    names = {f.name for f in families}
    assert {"llmserve_requests", "llmserve_slots", "llmserve_loaded_models"} <= names
    for family in families:
        for s in family.samples:
            assert s.labels.get("replica") == "gpu-1", s
    m = samples(client.get("/metrics").text)
    assert value(m, "llmserve_requests_total", route="/v1/chat/completions", status="200",
                 replica="gpu-1") == 1


def test_metrics_can_be_public(make_app: Callable[..., Starlette]) -> None:
    options = ServerOptions(api_keys=("sk",), metrics_public=True)
    client = TestClient(make_app(FakeEngine(), options=options), raise_server_exceptions=False)
    assert client.get("/metrics").status_code == 200
    assert client.get("/v1/models").status_code == 401


async def test_metrics_show_busy_slots_and_queue_depth(
    make_app: Callable[..., Starlette]
) -> None:
    import asyncio

    import httpx

    engine = FakeEngine(parallel=1, script=Script(tokens=("a",) * 15, delay=0.02))
    app = make_app(engine, max_queue=4)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        running = [asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                   for _ in range(3)]
        await wait_until_async(lambda: engine.started, what="the first request to start")
        m = samples((await client.get("/metrics")).text)
        assert value(m, "llmserve_slots_busy", model="fake-model") == 1
        assert value(m, "llmserve_queue_depth", model="fake-model") == 2
        assert all(r.status_code == 200 for r in await asyncio.gather(*running))


# -- access log ------------------------------------------------------------------------------


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.access for r in caplog.records if r.name == "llmserve.access"]  # type: ignore[attr-defined]


def test_one_access_line_per_request_with_request_id_and_tokens(
    make_app: Callable[..., Starlette], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmserve.access")
    client = TestClient(make_app(FakeEngine()), raise_server_exceptions=False)
    r = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = client.get("/v1/models").headers["x-request-id"]
    assert len(generated) == 32 and generated != "abc-123"
    assert client.get("/nope").status_code == 404
    records = access_records(caplog)
    assert [(a["request_id"], a["route"], a["status"]) for a in records] == [
        ("abc-123", "/v1/chat/completions", 200),
        (generated, "/v1/models", 200),
        (records[2]["request_id"], "unmatched", 404),
    ]
    chat = records[0]
    assert chat["prompt_tokens"] > 0 and chat["completion_tokens"] == 4
    assert chat["ttft_s"] >= 0 and chat["tokens_per_s"] > 0 and chat["model"] == "fake-model"
    line = next(r.getMessage() for r in caplog.records if r.name == "llmserve.access")
    assert line.startswith('testclient "POST /v1/chat/completions" 200 request_id=abc-123 ')
    assert "completion_tokens=4" in line and "ttft_s=" in line
    # never the prompt or the output, unless --log-prompts
    assert "zebra" not in caplog.text and "Hello" not in caplog.text


def test_log_prompts_puts_body_and_output_in_the_access_line(
    make_app: Callable[..., Starlette], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmserve.access")
    client = TestClient(make_app(FakeEngine(), options=ServerOptions(log_prompts=True)),
                        raise_server_exceptions=False)
    assert client.post("/v1/chat/completions", json={**CHAT, "stream": True}).status_code == 200
    (record,) = access_records(caplog)
    assert "zebra" in record["request_body"]
    assert record["output"] == "Hello, world!"


def test_an_injected_request_id_is_replaced(make_app: Callable[..., Starlette]) -> None:
    client = TestClient(make_app(FakeEngine()), raise_server_exceptions=False)
    r = client.get("/health", headers={"X-Request-ID": "x" * 500})
    assert len(r.headers["x-request-id"]) == 32


def test_json_log_format_is_one_object_per_line(
    make_app: Callable[..., Starlette], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmserve.access")
    client = TestClient(make_app(FakeEngine()), raise_server_exceptions=False)
    client.post("/v1/chat/completions", json=CHAT)
    access = next(r for r in caplog.records if r.name == "llmserve.access")
    out = json.loads(JsonFormatter().format(access))
    assert out["logger"] == "llmserve.access" and out["level"] == "info"
    assert out["status"] == 200 and out["route"] == "/v1/chat/completions"
    assert out["completion_tokens"] == 4 and out["time"].endswith("Z")
    other = logging.LogRecord("llmserve.server", logging.WARNING, __file__, 1, "hi %s",
                              ("there",), None)
    assert json.loads(JsonFormatter().format(other))["message"] == "hi there"
