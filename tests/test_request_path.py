"""Tier 2: one request path. The same rule, tried through every route family (OpenAI chat and
completions, LM Studio's v0 chat, llama.cpp's /completion, KoboldCpp's generate and stream, the
seed's /generate, /chat and /generate/batch, Ollama's /api/chat and /api/generate): the client's
values win over a model's defaults, bad numbers are the same 400, ``model`` is honoured, and
OpenAI fields we do not implement are refused."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.config import ModelSpec
from llmserve.params import OPENAI_CHAT_ONLY
from tests.fakes import FakeEngine

MESSAGES = [{"role": "user", "content": "Hi"}]
# what every family but the seed's accepts under llama.cpp's name
LLAMA_FIELDS = frozenset({"temperature", "top_k", "dry_base", "samplers"})


@dataclass(frozen=True)
class Route:
    path: str
    body: dict[str, Any]
    # vocabulary name → this family's spelling, where they differ
    spelled: dict[str, str] = field(default_factory=dict)
    accepts: frozenset[str] = LLAMA_FIELDS
    model_key: str = "model"
    detail: bool = False  # the seed's {"detail": ...} error shape
    ollama: bool = False  # sampling fields inside "options"; errors as {"error": message}

    def name(self, key: str) -> str:
        return self.spelled.get(key, key)

    def param(self, key: str) -> str:
        """How an error names the field."""
        return f"options.{self.name(key)}" if self.ollama else self.name(key)

    def with_sampling(self, values: dict[str, Any]) -> dict[str, Any]:
        if self.ollama:
            return {**self.body, "options": values}
        return {**self.body, **values}

    def with_raw(self, key: str, raw: str) -> str:
        """The body as JSON text with ``key`` set to ``raw`` (a JSON token such as NaN)."""
        field = f'"{self.name(key)}": {raw}'
        return json.dumps(self.body)[:-1] + (f', "options": {{{field}}}}}' if self.ollama
                                             else f", {field}}}")

    def error_message(self, body: dict[str, Any]) -> str:
        if self.detail:
            return str(body["detail"])
        return str(body["error"] if self.ollama else body["error"]["message"])


OPENAI_CHAT = Route("/v1/chat/completions", {"messages": MESSAGES})
OPENAI_COMPLETIONS = Route("/v1/completions", {"prompt": "Hi"})
LLAMACPP = Route("/completion", {"prompt": "Hi"})
KOBOLD = {"repeat_penalty": "rep_pen"}
NATIVE = {"repeat_penalty": "repetition_penalty"}
NATIVE_FIELDS = frozenset({"temperature", "top_k"})
OLLAMA_FIELDS = frozenset({"temperature", "top_k", "repeat_penalty"})

ROUTES = [
    pytest.param(OPENAI_CHAT, id="openai-chat"),
    pytest.param(OPENAI_COMPLETIONS, id="openai-completions"),
    pytest.param(LLAMACPP, id="llamacpp-completion"),
    pytest.param(Route("/api/v1/generate", {"prompt": "Hi"}, KOBOLD), id="kobold-generate"),
    pytest.param(Route("/api/extra/generate/stream", {"prompt": "Hi"}, KOBOLD),
                 id="kobold-stream"),
    pytest.param(Route("/generate", {"prompt": "Hi"}, NATIVE, NATIVE_FIELDS, "model_id", True),
                 id="native-generate"),
    pytest.param(Route("/chat", {"messages": MESSAGES}, NATIVE, NATIVE_FIELDS, "model_id", True),
                 id="native-chat"),
    pytest.param(Route("/generate/batch", {"prompts": ["Hi"]}, NATIVE, NATIVE_FIELDS,
                       "model_id", True), id="native-batch"),
    pytest.param(Route("/api/v0/chat/completions", {"messages": MESSAGES}), id="lmstudio-chat"),
    pytest.param(Route("/api/chat", {"messages": MESSAGES, "model": "x", "stream": False},
                       accepts=OLLAMA_FIELDS, ollama=True), id="ollama-chat"),
    pytest.param(Route("/api/generate", {"prompt": "Hi", "model": "x", "stream": False},
                       accepts=OLLAMA_FIELDS, ollama=True), id="ollama-generate"),
]


def spec(model_id: str, **kw: Any) -> ModelSpec:
    return ModelSpec(id=model_id, path=Path(f"/models/{model_id}.gguf"), **kw)


# -- the client's values win over the model's -----------------------------------------------------


@pytest.fixture
def configured(make_app: Callable[..., Starlette]) -> Iterator[tuple[TestClient, FakeEngine]]:
    """A model whose models.toml [sampling] table sets temperature 0.1, top_k 5."""
    engine = FakeEngine()
    sampling = {"temperature": 0.1, "top_k": 5}
    app = make_app(engine, specs=[spec(engine.model_id, sampling=sampling)])
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, engine


@pytest.mark.parametrize("route", ROUTES)
def test_client_values_win_over_model_defaults(
    configured: tuple[TestClient, FakeEngine], route: Route
) -> None:
    client, engine = configured
    r = client.post(route.path, json=route.with_sampling({"temperature": 0.9, "top_k": 40}))
    assert r.status_code == 200, r.text
    sampling = engine.requests[-1].sampling
    assert (sampling.temperature, sampling.top_k) == (0.9, 40)
    # omitted: the model's defaults (over the family's own, e.g. the seed API's 0.7 / 80)
    r = client.post(route.path, json=route.body)
    assert r.status_code == 200, r.text
    sampling = engine.requests[-1].sampling
    assert (sampling.temperature, sampling.top_k) == (0.1, 5)


# -- bad numbers: the same 400 on every family ----------------------------------------------------

BAD = [("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-Infinity"),
       ("temperature", "1e999"), ("temperature", "-1"), ("dry_base", "0.5"),
       ("repeat_penalty", "0")]


def _bad_cases() -> list[Any]:
    cases = []
    for param in ROUTES:
        route = param.values[0]
        for key, raw in BAD:
            if key in route.accepts or key in route.spelled:
                cases.append(pytest.param(route, key, raw, id=f"{param.id}-{key}={raw}"))
    return cases


@pytest.mark.parametrize(("route", "key", "raw"), _bad_cases())
def test_bad_numbers_are_the_same_400_everywhere(
    client: TestClient, engine: FakeEngine, route: Route, key: str, raw: str
) -> None:
    # raw JSON text: Python's json reads NaN/Infinity tokens, and 1e999 as inf
    content = route.with_raw(key, raw)
    wire = route.param(key)
    r = client.post(route.path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    if route.detail or route.ollama:
        assert f"'{wire}'" in route.error_message(r.json())
    else:
        error = r.json()["error"]
        assert error["param"] == wire and error["type"] == "invalid_request_error"
    assert not engine.requests, "a bad value reached the engine"
    assert client.post(route.path, json=route.body).status_code == 200  # still serving


@pytest.mark.parametrize("route", [OPENAI_CHAT, OPENAI_COMPLETIONS, LLAMACPP],
                         ids=["openai-chat", "openai-completions", "llamacpp-completion"])
def test_one_sampler_name_is_not_split_into_letters(
    client: TestClient, engine: FakeEngine, route: Route
) -> None:
    r = client.post(route.path, json={**route.body, "samplers": "top_k"})
    assert r.status_code == 200, r.text
    assert engine.requests[-1].sampling.samplers == ("top_k",)


# -- every family honours `model` -----------------------------------------------------------------


class TaggedEngine(FakeEngine):
    """Records every text it tokenises, so reads show which model served them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tokenized: list[str] = []

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        self.tokenized.append(text)
        return super().tokenize(text, add_special=add_special)


@pytest.fixture
def two_loaded(make_app: Callable[..., Starlette]
               ) -> Iterator[tuple[TestClient, dict[str, TaggedEngine]]]:
    engines: dict[str, TaggedEngine] = {}

    def loader(s: ModelSpec) -> TaggedEngine:
        engines[s.id] = TaggedEngine(model_id=s.id)
        return engines[s.id]

    app = make_app(loader=loader, specs=[spec("a", aliases=["alpha"]), spec("b")],
                   max_loaded_models=2)
    with TestClient(app, raise_server_exceptions=False) as client:
        for name in ("a", "b"):
            r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "model": name})
            assert r.status_code == 200, r.text
        assert set(engines) == {"a", "b"}
        yield client, engines


@pytest.mark.parametrize("route", ROUTES)
def test_every_family_honours_model(
    two_loaded: tuple[TestClient, dict[str, TaggedEngine]], route: Route
) -> None:
    client, engines = two_loaded
    # b was used last: asking for a must not land on b, and then b on a
    for name, other in (("a", "b"), ("b", "a"), ("alpha", "b")):
        served = engines["a" if name == "alpha" else name]
        before = (len(served.requests), len(engines[other].requests))
        r = client.post(route.path, json={**route.body, route.model_key: name})
        assert r.status_code == 200, r.text
        assert len(served.requests) == before[0] + 1
        assert len(engines[other].requests) == before[1]


@pytest.mark.parametrize("route", ROUTES)
def test_an_unknown_model_is_404_listing_the_known_ones(
    two_loaded: tuple[TestClient, dict[str, TaggedEngine]], route: Route
) -> None:
    client, _ = two_loaded
    r = client.post(route.path, json={**route.body, route.model_key: "nope"})
    assert r.status_code == 404, r.text
    assert "a, b" in route.error_message(r.json())


def test_a_model_is_found_by_its_gguf_path(
    two_loaded: tuple[TestClient, dict[str, TaggedEngine]]
) -> None:
    client, _ = two_loaded
    r = client.post("/completion", json={"prompt": "Hi", "model": "/models/a.gguf"})
    assert r.status_code == 200 and r.json()["model"] == "a"


READS: Sequence[Any] = [
    pytest.param("POST", "/tokenize", {"content": "Hi"}, id="tokenize"),
    pytest.param("POST", "/api/extra/tokencount", {"prompt": "Hi"}, id="kobold-tokencount"),
]


@pytest.mark.parametrize(("method", "path", "body"), READS)
@pytest.mark.parametrize("name", ["a", "b"])
def test_reads_resolve_the_named_model(
    two_loaded: tuple[TestClient, dict[str, TaggedEngine]], method: str, path: str,
    body: dict[str, Any], name: str,
) -> None:
    client, engines = two_loaded
    other = "b" if name == "a" else "a"
    seen = len(engines[other].tokenized)
    r = client.request(method, path, json={**body, "model": name})
    assert r.status_code == 200, r.text
    assert engines[name].tokenized[-1] == "Hi"
    assert len(engines[other].tokenized) == seen


def test_template_props_and_slots_resolve_the_named_model(
    two_loaded: tuple[TestClient, dict[str, TaggedEngine]]
) -> None:
    client, engines = two_loaded
    chats = len(engines["a"].chats)
    r = client.post("/apply-template", json={"messages": MESSAGES, "model": "a"})
    assert r.status_code == 200 and len(engines["a"].chats) == chats + 1
    assert client.get("/props?model=a").json()["model_alias"] == "a"
    assert client.get("/props?model=b").json()["model_alias"] == "b"
    assert client.get("/slots?model=a").json()[0]["params"]["model"] == "a"
    assert client.get("/props?model=nope").status_code == 404
    r = client.post("/detokenize", json={"tokens": [72], "model": "nope"})
    assert r.status_code == 404


# -- no silent drops on the OpenAI routes ---------------------------------------------------------

UNSUPPORTED = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("chat_template_kwargs", {"enable_thinking": False}), ("parallel_tool_calls", True),
    ("functions", [{"name": "f", "parameters": {}}]), ("function_call", {"name": "f"}),
]
OFF = [
    ("tools", None), ("tools", []), ("tool_choice", "none"), ("parallel_tool_calls", False),
    ("chat_template_kwargs", {}), ("functions", []),
]
OPENAI = [pytest.param(OPENAI_CHAT, id="chat"), pytest.param(OPENAI_COMPLETIONS, id="completions")]


@pytest.mark.parametrize(("route", "key", "value"), [
    pytest.param(route.values[0], k, v, id=f"{route.id}-{k}")
    for route in OPENAI for k, v in UNSUPPORTED
    # implemented on chat (tests/test_tool_calls_routes.py)
    if not (route.values[0] is OPENAI_CHAT and k in OPENAI_CHAT_ONLY)
])
def test_unsupported_openai_fields_are_400_naming_them(
    client: TestClient, engine: FakeEngine, route: Route, key: str, value: Any
) -> None:
    r = client.post(route.path, json={**route.body, key: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == key
    assert key in error["message"]
    assert not engine.requests


@pytest.mark.parametrize(("key", "value"), [
    *(pytest.param(k, v, id=f"{k}={v!r}") for k, v in OFF),
    pytest.param("suffix", "", id="suffix-empty"),
])
@pytest.mark.parametrize("route", OPENAI)
def test_values_that_mean_off_are_accepted(
    client: TestClient, route: Route, key: str, value: Any
) -> None:
    r = client.post(route.path, json={**route.body, key: value})
    assert r.status_code == 200, r.text


def test_truly_unknown_keys_stay_ignored(client: TestClient) -> None:
    r = client.post("/v1/chat/completions",
                    json={"messages": MESSAGES, "api_type": "x", "whatever": {"a": [1]}})
    assert r.status_code == 200
