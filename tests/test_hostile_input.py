"""Tier 2: hostile JSON is the client's error on every route that reads a JSON body — nesting
beyond the server's depth limit, a lone UTF-16 surrogate escape — answered with a 4xx in the
route family's own error shape, and the server keeps serving. Also: no JSON the server writes
carries NaN or Infinity."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

import llmserve
from llmserve.engine.types import Finish, GenerationStream, Timings, TokenEvent
from llmserve.server import sse
from llmserve.server.requests import MAX_JSON_DEPTH
from tests.fakes import FakeEngine

LONE = "\ud800"
CHAT = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Case:
    path: str
    body: dict[str, Any]
    field: str  # the key of ``body`` that carries text (or the nested value)
    detail: bool = False  # the seed routes answer {"detail": ...}
    ollama: bool = False  # Ollama's routes answer {"error": message}

    @property
    def id(self) -> str:
        return self.path


CASES = [
    Case("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4}, "messages"),
    Case("/chat/completions", {"messages": CHAT, "max_tokens": 4}, "messages"),
    Case("/v1/completions", {"prompt": "hi", "max_tokens": 4}, "prompt"),
    Case("/completion", {"prompt": "hi", "n_predict": 4}, "prompt"),
    Case("/completions", {"prompt": "hi", "n_predict": 4}, "prompt"),
    Case("/infill", {"input_prefix": "hi", "input_suffix": "!", "n_predict": 4}, "input_prefix"),
    Case("/tokenize", {"content": "hi"}, "content"),
    Case("/detokenize", {"tokens": [104, 105]}, "tokens"),
    Case("/apply-template", {"messages": CHAT}, "messages"),
    Case("/api/v1/generate", {"prompt": "hi", "max_length": 4}, "prompt"),
    Case("/api/extra/generate/stream", {"prompt": "hi", "max_length": 4}, "prompt"),
    Case("/api/extra/tokencount", {"prompt": "hi"}, "prompt"),
    Case("/api/extra/abort", {"genkey": "KCPP1"}, "genkey"),
    Case("/generate", {"prompt": "hi", "max_length": 4}, "prompt", detail=True),
    Case("/chat", {"messages": CHAT, "max_length": 4}, "messages", detail=True),
    Case("/generate/batch", {"prompts": ["hi"], "max_length": 4}, "prompts", detail=True),
    Case("/v1/models/load", {"model": "fake-model"}, "model"),
    Case("/models/load", {"model": "fake-model"}, "model"),
    Case("/v1/models/unload", {"model": "fake-model"}, "model"),
    Case("/models/unload", {"model": "fake-model"}, "model"),
    Case("/api/v0/chat/completions", {"messages": CHAT, "max_tokens": 4}, "messages"),
    Case("/api/v0/completions", {"prompt": "hi", "max_tokens": 4}, "prompt"),
    Case("/api/chat", {"model": "m", "messages": CHAT, "stream": False}, "messages", ollama=True),
    Case("/api/generate", {"model": "m", "prompt": "hi", "stream": False}, "prompt",
         ollama=True),
    Case("/api/show", {"model": "fake-model"}, "model", ollama=True),
    *(Case(f"/api/{op}", {"model": "m"}, "model", ollama=True)
      for op in ("pull", "push", "create")),
    Case("/api/copy", {"source": "a", "destination": "b"}, "source", ollama=True),
    Case("/lora-adapters", {"adapters": [{"id": 0, "scale": 1.0}]}, "adapters"),
    Case("/v1/lora/load", {"path": "adapter.gguf"}, "path"),
    Case("/v1/lora/unload", {"path": "adapter.gguf"}, "path"),
    Case("/v1/embeddings", {"input": "hi"}, "input"),
    Case("/embeddings", {"input": "hi"}, "input"),
    Case("/api/v0/embeddings", {"input": "hi"}, "input"),
    Case("/embedding", {"content": "hi"}, "content"),
    Case("/api/embed", {"input": "hi"}, "input"),
    Case("/api/embeddings", {"prompt": "hi"}, "prompt"),
    Case("/v1/rerank", {"query": "hi", "documents": ["a"]}, "query"),
    Case("/rerank", {"query": "hi", "documents": ["a"]}, "query"),
    Case("/v1/responses", {"input": "hi", "max_output_tokens": 4}, "input"),
    Case("/v1/tokenize", {"content": "hi"}, "content"),
    Case("/v1/detokenize", {"tokens": [104, 105]}, "tokens"),
    Case("/v1/batches", {"input_file_id": "file-x", "endpoint": "/v1/chat/completions"},
         "input_file_id"),
]
# POST routes that read no JSON body: multipart uploads (files, OpenAI's audio), and bodiless
# actions
NO_JSON_BODY = {"/v1/files", "/v1/audio/transcriptions", "/v1/audio/translations",
                "/v1/responses/{response_id}/cancel", "/v1/batches/{batch_id}/cancel"}


def _with_lone_surrogate(case: Case) -> tuple[dict[str, Any], str]:
    """The case's body with a lone surrogate in its text, and the path that names it."""
    body = json.loads(json.dumps(case.body))
    value = body[case.field]
    if isinstance(value, str):
        body[case.field] = f"a{LONE}b"
        return body, case.field
    if case.field == "messages":
        body["messages"][0]["content"] = f"a{LONE}b"
        return body, "messages[0].content"
    if case.field == "prompts":
        body["prompts"][0] = LONE
        return body, "prompts[0]"
    body["note"] = LONE  # /detokenize has no text field: anywhere in the body counts
    return body, "note"


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _post_raw(client: TestClient, path: str, raw: str) -> Any:
    # json.dumps' default ensure_ascii writes a lone surrogate as the escape "\ud800"
    return client.post(path, content=raw.encode("ascii"),
                       headers={"content-type": "application/json"})


def _assert_client_error(r: Any, case: Case, *, says: str, param: str | None = None) -> None:
    assert r.status_code == 400, (case.path, r.status_code, r.text)
    body = r.json()
    if case.detail:
        assert set(body) == {"detail"}
        assert says in body["detail"]
    elif case.ollama:
        assert set(body) == {"error"}
        assert says in body["error"]
    else:
        error = body["error"]
        assert error["type"] == "invalid_request_error"
        assert says in error["message"], error
        assert error["param"] == param


def _assert_still_serving(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello, world!"


@pytest.fixture
def hostile_client(make_app: Callable[..., Starlette], engine: FakeEngine) -> Any:
    with TestClient(make_app(engine), raise_server_exceptions=False) as c:
        yield c


def test_the_cases_cover_every_route_that_reads_a_body(
    make_app: Callable[..., Starlette], engine: FakeEngine
) -> None:
    app = make_app(engine)
    posts = {r.path for r in app.routes if isinstance(r, Route) and "POST" in (r.methods or ())}
    assert posts - NO_JSON_BODY == {c.path for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_nesting_10000_deep_is_a_400(hostile_client: TestClient, case: Case) -> None:
    raw = json.dumps(case.body)[:-1] + f', "{case.field}_deep": {_nested(10_000)}}}'
    r = _post_raw(hostile_client, case.path, raw)
    _assert_client_error(r, case, says=f"more than {MAX_JSON_DEPTH} levels deep")
    r = _post_raw(hostile_client, case.path, _nested(10_000))  # not even an object at the top
    assert r.status_code == 400, r.text
    _assert_still_serving(hostile_client)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_lone_surrogate_is_a_400_naming_where(hostile_client: TestClient, case: Case) -> None:
    body, where = _with_lone_surrogate(case)
    r = _post_raw(hostile_client, case.path, json.dumps(body))
    _assert_client_error(r, case, says="lone UTF-16 surrogate", param=where)
    _assert_still_serving(hostile_client)


def test_the_depth_limit_is_exact(hostile_client: TestClient) -> None:
    # the top-level object is level 1, so a value nested N - 1 deep inside it is level N
    case = Case("/tokenize", {"content": "hi"}, "content")
    at_limit = json.dumps({"content": "hi", "x": json.loads(_nested(MAX_JSON_DEPTH - 1))})
    assert _post_raw(hostile_client, "/tokenize", at_limit).status_code == 200
    over = json.dumps({"content": "hi", "x": json.loads(_nested(MAX_JSON_DEPTH))})
    _assert_client_error(_post_raw(hostile_client, "/tokenize", over), case,
                         says=f"more than {MAX_JSON_DEPTH} levels deep")
    # deep in a list, behind shallow siblings
    wide = {"content": "hi", "x": [[1, [2]], {"a": json.loads(_nested(MAX_JSON_DEPTH - 2))}]}
    _assert_client_error(_post_raw(hostile_client, "/tokenize", json.dumps(wide)), case,
                         says="levels deep")


@pytest.mark.parametrize("text", [
    "\U0001F600",  # an emoji: escaped as a surrogate pair, which is one character
    "\\ud800",  # a backslash, then the letters "ud800"
    "\u00e9\u4e2d",
], ids=["pair", "escaped-backslash", "bmp"])
def test_valid_escapes_pass(hostile_client: TestClient, text: str) -> None:
    r = _post_raw(hostile_client, "/tokenize", json.dumps({"content": text}))
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == [ord(c) for c in text]


@pytest.mark.parametrize(("body", "where"), [
    ({"content": "hi", LONE: 1}, "\\ud800"),
    ({"content": "hi", "x": {"y": [0, {"z": "\udfff"}]}}, "x.y[1].z"),
    ({"content": "hi", "x": ["\ud83d\ud83d\ude00"]}, "x[0]"),  # a high one, then a pair
], ids=["in-a-key", "deep", "before-a-pair"])
def test_lone_surrogates_anywhere(hostile_client: TestClient, body: dict[str, Any],
                                  where: str) -> None:
    r = _post_raw(hostile_client, "/tokenize", json.dumps(body))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == where


# -- no NaN or Infinity leaves the server ------------------------------------------------------


def test_sse_event_refuses_non_finite_numbers() -> None:
    assert sse.event({"x": 1.5}) == b'data: {"x":1.5}\n\n'
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            sse.event({"x": [bad]})


def test_every_json_dumps_in_the_server_refuses_nan() -> None:
    """Every hand-written serialisation of something a client receives passes allow_nan=False
    (Starlette's JSONResponse already does)."""
    root = Path(llmserve.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("dumps", "dump")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "json"):
                allow_nan = next((k.value for k in node.keywords if k.arg == "allow_nan"), None)
                if not (isinstance(allow_nan, ast.Constant) and allow_nan.value is False):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    # what is not sent to a client: log lines, the CLI's own output (cli.py, ask.py), the chat
    # template's tojson (text inside the prompt), the JSON schema handed to the grammar converter
    not_sent = {"server/access.py", "cli.py", "ask.py", "engine/chat_template.py",
                "engine/sampling.py"}
    assert [o for o in offenders if o.split(":")[0] not in not_sent] == []


class NanEngine(FakeEngine):
    """Log-probabilities and timings that are NaN or infinite: a bug upstream must not become
    a byte that is not JSON on the wire."""

    def _run(self, stream: GenerationStream, script: Any) -> None:
        push = stream.push

        def poisoned(event: Any) -> None:
            if isinstance(event, TokenEvent) and event.logprob is not None:
                event = TokenEvent(event.token_id, event.text, math.nan,
                                   tuple((t, math.inf) for t, _ in event.top_logprobs))
            elif isinstance(event, Finish):
                event = dataclasses.replace(event, timings=Timings(prompt_ms=math.nan,
                                                                   predicted_ms=math.inf))
            push(event)

        stream.push = poisoned  # type: ignore[method-assign]
        super()._run(stream, script)


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} on the wire: {text}")

    return json.loads(text, parse_constant=refuse)


# (path, body, whether the route reports the poisoned numbers and so must fail)
GENERATING = [
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4}, True),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4}, True),
    ("/completion", {"prompt": "hi", "n_predict": 4, "n_probs": 2}, True),
    ("/api/v1/generate", {"prompt": "hi", "max_length": 4}, False),
    ("/generate", {"prompt": "hi", "max_length": 4}, False),
    ("/chat", {"messages": CHAT, "max_length": 4}, False),
    ("/generate/batch", {"prompts": ["hi"], "max_length": 4}, False),
    ("/api/v0/chat/completions", {"messages": CHAT, "max_tokens": 4}, True),
    ("/api/v0/completions", {"prompt": "hi", "max_tokens": 4}, True),
]
STREAMING = {"/api/v1/generate": "/api/extra/generate/stream"}


@pytest.mark.parametrize(("path", "body", "reports", "stream"), [
    *((path, body, reports, False) for path, body, reports in GENERATING),
    *((path, body, reports, True) for path, body, reports in GENERATING
      if path != "/generate/batch"),  # it does not stream
], ids=lambda v: v if isinstance(v, str) else None)
def test_no_route_emits_nan_or_infinity(
    make_app: Callable[..., Starlette], path: str, body: dict[str, Any], reports: bool,
    stream: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    if stream:
        path, body = STREAMING.get(path, path), {**body, "stream": True}
    with TestClient(make_app(NanEngine()), raise_server_exceptions=False) as c:
        r = c.post(path, json=body)
    if not stream:
        _strict_json(r.text)
        assert r.status_code == (500 if reports else 200), r.text
    else:
        assert r.status_code == 200
        datas = [line[len("data: "):] for line in r.text.splitlines()
                 if line.startswith("data: ")]
        # JSON events, or the seed's plain-text ones; the fake's tokens never start with "{"
        payloads = [_strict_json(d) for d in datas if d.startswith("{")]
        errors = [p for p in payloads if isinstance(p, dict) and "error" in p]
        assert bool(errors) == reports, r.text
        if reports:
            assert errors[-1]["error"]["type"] == "server_error"
    if reports:  # a bug: logged with its cause
        assert any(rec.levelname == "ERROR" for rec in caplog.records)
