"""Tier 2: LM Studio's REST API v0 completions over a FakeEngine: OpenAI's bodies plus the
documented ``stats``, ``model_info`` and ``runtime`` (lmstudio.ai/docs/developer/rest/endpoints),
streamed and not."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.config import ModelSpec
from llmserve.engine.types import Finish, Timings
from llmserve.server.routes.lmstudio import stats
from tests.fakes import FakeEngine
from tests.test_gguf_info import LLAMA_META, write_gguf
from tests.test_openai_routes import sse_payloads

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
PATHS = {"/api/v0/chat/completions": CHAT,
         "/api/v0/completions": {"prompt": "Hi", "max_tokens": 8}}


@pytest.fixture
def lm_client(make_app: Callable[..., Starlette], tmp_path: Path) -> Any:
    path = write_gguf(tmp_path / "tiny.gguf", LLAMA_META, [("token_embd.weight", (64, 32), 12)])
    engine = FakeEngine(model_id="tiny")
    engine._info = dataclasses.replace(engine.info, path=str(path))
    with TestClient(make_app(engine), raise_server_exceptions=False) as c:
        yield c


def _check_extras(body: dict[str, Any], reason: str) -> None:
    assert set(body["stats"]) == {"tokens_per_second", "time_to_first_token",
                                  "generation_time", "stop_reason"}
    assert body["stats"]["stop_reason"] == reason
    assert all(isinstance(body["stats"][k], int | float)
               for k in ("tokens_per_second", "time_to_first_token", "generation_time"))
    assert body["model_info"] == {"arch": "llama", "quant": "Q4_K_M", "format": "gguf",
                                  "context_length": 256}
    assert body["runtime"]["supported_formats"] == ["gguf"]
    assert body["runtime"]["name"] and body["runtime"]["version"]


@pytest.mark.parametrize("path", PATHS)
def test_whole_answer_is_openais_plus_stats(lm_client: TestClient, path: str) -> None:
    body = lm_client.post(path, json=PATHS[path]).json()
    assert body["object"] in ("chat.completion", "text_completion")
    assert body["usage"]["completion_tokens"] == 4
    _check_extras(body, "eosFound")


@pytest.mark.parametrize("path", PATHS)
def test_stream_carries_them_on_the_last_choice(lm_client: TestClient, path: str) -> None:
    r = lm_client.post(path, json={**PATHS[path], "stream": True, "max_tokens": 2})
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"][0]["finish_reason"] == "length"
    _check_extras(last, "maxPredictedTokensReached")
    assert all("stats" not in e for e in events[:-2])


def test_stop_string_reason(lm_client: TestClient) -> None:
    body = lm_client.post("/api/v0/chat/completions", json={**CHAT, "stop": [" world"]}).json()
    assert body["stats"]["stop_reason"] == "stopStringFound"


def test_stats_arithmetic() -> None:
    finish = Finish("stop", 10, 50, timings=Timings(prompt_ms=250.0, predicted_ms=2000.0))
    assert stats(finish) == {"tokens_per_second": 25.0, "time_to_first_token": 0.25,
                             "generation_time": 2.0, "stop_reason": "eosFound"}


def test_jit_loading_and_ttl_as_the_openai_routes(make_app: Callable[..., Starlette]) -> None:
    def loader(spec: ModelSpec) -> FakeEngine:
        return FakeEngine(model_id=spec.id)

    app = make_app(loader=loader, specs=[ModelSpec(id="a", path=Path("/m/a.gguf"))])
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/api/v0/chat/completions", json={**CHAT, "model": "a", "ttl": 30})
        assert r.status_code == 200, r.text
        status = app.state.llmserve.host.statuses()[0]
        assert status.state == "loaded" and status.keep_alive == 30
        # the file is not a GGUF (a fake): model_info says what the engine knows
        assert r.json()["model_info"]["context_length"] == 256
        assert r.json()["model_info"]["arch"] is None
        bad = c.post("/api/v0/chat/completions", json={**CHAT, "temperature": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"

