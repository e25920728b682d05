"""Tier 3: a grammar the request itself makes impossible is the client's error on the real model,
on every route family that takes a grammar, streamed and not: a 400 before any token where that
can be known, else a 400 (or, once a stream has started, an SSE error event with it) at the token
where the grammar leaves nothing to sample. The server keeps serving."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.real

GRAMMAR = 'root ::= "a"'
ROUTES = [
    ("/completion", {"prompt": "Say a:", "grammar": GRAMMAR, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "Say a:", "grammar": GRAMMAR, "ignore_eos": True,
                         "max_tokens": 8}),
    ("/api/v1/generate", {"prompt": "Say a:", "grammar": GRAMMAR, "bypass_eos": True,
                          "max_length": 8}),
]
STREAM_PATH = {"/api/v1/generate": "/api/extra/generate/stream"}


def _route(path: str, body: dict[str, Any], stream: bool) -> tuple[str, dict[str, Any]]:
    if path in STREAM_PATH:
        return (STREAM_PATH[path] if stream else path), body
    return path, {**body, "stream": stream}


def _events(text: str) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for block in text.strip().split("\n\n"):
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        out.append((name, "\n".join(data)))
    return out


def _assert_serving(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/completion",
                   json={"prompt": "The capital of France is", "n_predict": 3,
                         "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["tokens_predicted"] == 3


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("path", "body"), ROUTES, ids=[p for p, _ in ROUTES])
def test_a_certain_dead_end_is_refused_before_any_token(
    real_server: ServerProcess, path: str, body: dict[str, Any], stream: bool
) -> None:
    path, body = _route(path, body, stream)
    for _ in range(2):  # not a transient failure: the same answer every time
        r = httpx.post(real_server.url + path, json=body, timeout=120)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["code"] == "grammar_dead_end", error
        assert error["param"] == "grammar" and "ignore_eos" in error["message"]
    _assert_serving(real_server)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("path", "body"), ROUTES, ids=[p for p, _ in ROUTES])
def test_a_dead_end_met_while_generating_is_the_clients_error(
    real_server: ServerProcess, path: str, body: dict[str, Any], stream: bool
) -> None:
    # A stop string could end the generation, so nothing is refused up front; the grammar
    # still leaves no token after "a", and the sampler finds that at the second token.
    stop_field = "stop_sequence" if path in STREAM_PATH else "stop"
    path, body = _route(path, {**body, stop_field: ["zzz"]}, stream)
    r = httpx.post(real_server.url + path, json=body, timeout=120)
    if not stream:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
    else:
        assert r.status_code == 200, r.text
        events = _events(r.text)
        for _, data in events:  # every event is JSON (or the closing [DONE])
            assert data == "[DONE]" or json.loads(data) is not None
        last = events[-1] if events[-1][1] != "[DONE]" else events[-2]
        if path.startswith("/api/"):
            assert last[0] == "error"
        error = json.loads(last[1])["error"]
        content = "".join(json.loads(d).get("content") or json.loads(d).get("token") or
                          (json.loads(d).get("choices") or [{}])[0].get("text", "")
                          for _, d in events[:-1] if d != "[DONE]" and "error" not in d)
        assert content == "a", r.text
    assert error["code"] == "grammar_dead_end", error
    assert error["type"] == "invalid_request_error" and error["param"] == "grammar"
    _assert_serving(real_server)
