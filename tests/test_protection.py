"""API keys, rate limits, body limits, the max_tokens ceiling and CORS (tiers 1 and 2)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from llmserve.config import Settings, parse_byte_size, parse_rate_limit
from llmserve.errors import RateLimited
from llmserve.server.generation import Limits
from llmserve.server.options import ServerOptions
from llmserve.server.ratelimit import RateLimit, RateLimiter
from tests.fakes import FakeEngine, Script

CHAT = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
KEYS = ("sk-first", "sk-second")
PUBLIC = {("GET", "/health"), ("HEAD", "/health"), ("GET", "/v1/health"), ("HEAD", "/v1/health"),
          # the chat page and its files: it must load to ask for the key (test_webui.py)
          ("GET", "/"), ("HEAD", "/"), ("GET", "/webui/x"), ("HEAD", "/webui/x")}


def keyed_client(make_app: Callable[..., Starlette], **options: Any) -> TestClient:
    app = make_app(FakeEngine(), options=ServerOptions(api_keys=KEYS, **options))
    return TestClient(app, raise_server_exceptions=False)


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


# -- API keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("metrics_public", [False, True], ids=["metrics-private",
                                                              "metrics-public"])
def test_no_route_but_the_public_ones_answers_without_a_key(
    make_app: Callable[..., Starlette], metrics_public: bool
) -> None:
    public = PUBLIC | ({(m, p) for m in ("GET", "HEAD") for p in ("/metrics", "/v1/metrics")}
                       if metrics_public else set())
    client = keyed_client(make_app, metrics_public=metrics_public)
    routes = [r for r in client.app.routes if isinstance(r, Route)]  # type: ignore[attr-defined]
    assert len(routes) >= 10
    seen = set()
    for route in routes:
        for method in sorted(route.methods or ()):
            path = concrete(route.path)
            seen.add((method, path))
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "sk-firs"}):
                r = client.request(method, path, headers=headers, json=CHAT)
                if (method, path) in public:
                    assert r.status_code != 401, (method, path)
                else:
                    assert r.status_code == 401, (method, path, headers, r.text)
                    if method != "HEAD":  # in the route family's own error shape
                        body = r.json()
                        error = body.get("detail") or body["error"]
                        assert (error["code"] == "invalid_api_key" if isinstance(error, dict)
                                else "API key" in error), (path, body)
    assert public <= seen
    # paths that match no route are refused too, not answered 404 to strangers
    assert client.get("/nope").status_code == 401
    assert client.options("/v1/models").status_code == 401


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer sk-first"},
    {"Authorization": "bearer sk-second"},
    {"x-api-key": "sk-second"},
    {"Authorization": "Basic abc", "x-api-key": "sk-first"},
], ids=["bearer", "bearer-lowercase-second-key", "x-api-key", "x-api-key-beside-other-auth"])
def test_a_valid_key_in_either_header_is_accepted(
    make_app: Callable[..., Starlette], headers: dict[str, str]
) -> None:
    client = keyed_client(make_app)
    assert client.get("/v1/models", headers=headers).status_code == 200
    r = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello, world!"


def test_401_is_the_openai_envelope(make_app: Callable[..., Starlette]) -> None:
    r = keyed_client(make_app).post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": {"message": r.json()["error"]["message"],
                                  "type": "invalid_request_error", "param": None,
                                  "code": "invalid_api_key"}}


@pytest.mark.parametrize("authorization", ["Bearer ", "Bearer sk-anything", "Basic Zm9v"],
                         ids=["empty-bearer", "any-bearer", "basic"])
def test_without_keys_any_authorization_header_is_ignored(
    client: TestClient, authorization: str
) -> None:
    r = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": authorization})
    assert r.status_code == 200


def test_api_key_file_lines_comments_and_flags_merge(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# service keys\nsk-a\n\n  sk-b  \n# sk-commented\nsk-flag\n")
    settings = Settings(api_key=["sk-flag"], api_key_file=keys)
    assert settings.all_api_keys() == ("sk-flag", "sk-a", "sk-b")
    with pytest.raises(ValueError, match="cannot read"):
        Settings(api_key_file=tmp_path / "missing").all_api_keys()
    keys.write_text("sk a\n")
    with pytest.raises(ValueError, match="whitespace"):
        Settings(api_key_file=keys).all_api_keys()


# -- rate limits -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("60/minute", (60.0, 60.0)),
    ("60/min", (60.0, 60.0)),
    ("5/second", (5.0, 1.0)),
    ("5/s", (5.0, 1.0)),
    ("1000/hour", (1000.0, 3600.0)),
    ("10/5minutes", (10.0, 300.0)),
    ("off", None),
    ("OFF", None),
    ("0", None),
], ids=lambda v: str(v))
def test_rate_limit_parses(text: str, expected: tuple[float, float] | None) -> None:
    assert parse_rate_limit(text) == expected


@pytest.mark.parametrize("text", ["60", "60/fortnight", "-1/minute", "/minute", "0/minute",
                                  "lots"], ids=str)
def test_bad_rate_limit_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="N/minute"):
        Settings(rate_limit=text)


@pytest.mark.parametrize(("host", "flag", "expected"), [
    ("127.0.0.1", None, None),
    ("localhost", None, None),
    ("::1", None, None),
    ("0.0.0.0", None, (60.0, 60.0)),
    ("192.168.1.5", None, (60.0, 60.0)),
    ("0.0.0.0", "off", None),
    ("127.0.0.1", "2/second", (2.0, 1.0)),
], ids=lambda v: str(v))
def test_rate_limit_is_on_by_default_only_off_loopback(
    host: str, flag: str | None, expected: tuple[float, float] | None
) -> None:
    assert Settings(host=host, rate_limit=flag).effective_rate_limit() == expected


def test_token_bucket_bursts_then_paces() -> None:
    now = [0.0]
    limiter = RateLimiter(RateLimit(60, 60.0, burst=3), clock=lambda: now[0])
    assert [limiter.take("a").remaining for _ in range(3)] == [2, 1, 0]
    with pytest.raises(RateLimited) as refused:
        limiter.take("a")
    assert refused.value.retry_after == pytest.approx(1.0)
    assert refused.value.limit == 3 and refused.value.remaining == 0
    assert limiter.take("b").remaining == 2  # another client has its own bucket
    now[0] = 1.0
    assert limiter.take("a").remaining == 0  # one request refilled after a second
    now[0] = 100.0
    assert limiter.take("a").remaining == 2  # never more than the burst


def test_429_after_the_burst_with_retry_after_and_ratelimit_headers(
    make_app: Callable[..., Starlette]
) -> None:
    options = ServerOptions(api_keys=KEYS, rate_limit=RateLimit(60, 60.0, burst=3))
    client = TestClient(make_app(FakeEngine(), options=options), raise_server_exceptions=False)
    first = {"Authorization": "Bearer sk-first"}
    answers = [client.get("/v1/models", headers=first) for _ in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
    assert answers[0].headers["x-ratelimit-limit"] == "3"
    assert answers[0].headers["x-ratelimit-remaining"] == "2"
    refused = answers[3]
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert int(refused.headers["x-ratelimit-reset"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    # each key has its own bucket; /health is never limited
    assert client.get("/v1/models", headers={"x-api-key": "sk-second"}).status_code == 200
    assert all(client.get("/health").status_code == 200 for _ in range(5))


def test_without_keys_the_client_address_is_limited(make_app: Callable[..., Starlette]) -> None:
    options = ServerOptions(rate_limit=RateLimit(1, 60.0, burst=2))
    client = TestClient(make_app(FakeEngine(), options=options), raise_server_exceptions=False)
    codes = [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


# -- body size and max_tokens ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("4MB", 4 * 1024**2), ("512KB", 512 * 1024), ("1048576", 1048576), ("1.5k", 1536),
    ("2 GiB", 2 * 1024**3),
], ids=str)
def test_byte_sizes_parse(text: str, expected: int) -> None:
    assert parse_byte_size(text) == expected
    assert Settings(max_body_size=text).max_body_size == expected  # type: ignore[arg-type]


def test_a_declared_oversized_body_is_refused_before_any_work(
    make_app: Callable[..., Starlette], engine: FakeEngine
) -> None:
    client = TestClient(make_app(engine, options=ServerOptions(max_body_size=1000)),
                        raise_server_exceptions=False)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert "1000 bytes" in r.json()["error"]["message"]
    assert engine.requests == []
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


async def test_a_chunked_oversized_body_is_refused_without_reading_it_all(
    make_app: Callable[..., Starlette], engine: FakeEngine
) -> None:
    app = make_app(engine, options=ServerOptions(max_body_size=10_000))
    chunks = [b"x" * 4096] * 100  # 400 KB offered without a Content-Length
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": True}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"
    assert pulled == 3  # stopped at the first chunk past 10 000 bytes
    assert engine.requests == []


@pytest.mark.parametrize(("path", "stream"), [
    ("/v1/chat/completions", False), ("/v1/chat/completions", True),
    ("/v1/completions", False), ("/v1/completions", True),
], ids=["chat", "chat-stream", "completions", "completions-stream"])
@pytest.mark.parametrize("requested", [None, 50], ids=["unset", "above-ceiling"])
def test_the_max_tokens_ceiling_applies_to_every_generating_route(
    make_app: Callable[..., Starlette], path: str, stream: bool, requested: int | None
) -> None:
    engine = FakeEngine(script=Script(tokens=tuple("abcdefgh")))
    client = TestClient(make_app(engine, limits=Limits(max_tokens_limit=3)),
                        raise_server_exceptions=False)
    body: dict[str, Any] = {"model": "x", "stream": stream, "max_tokens": requested}
    body.update({"messages": CHAT["messages"]} if "chat" in path else {"prompt": "hi"})
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    assert engine.requests[-1].max_tokens == 3
    assert '"finish_reason":"length"' in r.text.replace(" ", "")
    assert "".join(re.findall(r'"(?:content|text)": ?"([^"]*)"', r.text)) == "abc"


# -- CORS ------------------------------------------------------------------------------------


def test_cors_is_off_by_default(client: TestClient) -> None:
    r = client.get("/v1/models", headers={"Origin": "http://ui.example"})
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize(("origins", "origin", "allowed"), [
    (("http://ui.example",), "http://ui.example", "http://ui.example"),
    (("*",), "http://anything.example", "*"),
], ids=["listed-origin", "star"])
def test_cors_preflight_is_answered_without_a_key(
    make_app: Callable[..., Starlette], origins: tuple[str, ...], origin: str, allowed: str
) -> None:
    client = keyed_client(make_app, cors_origins=origins)
    r = client.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == allowed
    assert "POST" in r.headers["access-control-allow-methods"]
    r = client.post("/v1/chat/completions", json=CHAT,
                    headers={"Origin": origin, "Authorization": "Bearer sk-first"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == allowed
    assert "X-Request-ID" in r.headers["access-control-expose-headers"]
    # a refusal carries the CORS headers too, so the page can read the error
    r = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": origin})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == allowed


def test_cors_refuses_an_unlisted_origin(make_app: Callable[..., Starlette]) -> None:
    client = keyed_client(make_app, cors_origins=("http://ui.example",))
    r = client.options("/v1/models", headers={"Origin": "http://evil.example",
                                              "Access-Control-Request-Method": "GET"})
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers
