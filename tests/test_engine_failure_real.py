"""Tier 3: the real engine's worker thread dies (an exception escapes a decode step) and the
server sees it: 503 model_failed, /health names the model, the next request reloads it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.config import ModelSpec
from llmserve.engine.types import EngineProtocol
from tests.polling import wait_until

pytestmark = pytest.mark.real

BODY = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}


def test_a_dead_worker_is_503_model_failed_then_the_model_is_reloaded(
    demo_model: Path, make_app: Callable[..., Starlette], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from llmserve.engine.engine import Engine

    engines: list[Engine] = []

    def loader(spec: ModelSpec) -> EngineProtocol:
        engines.append(Engine.load(spec.path, model_id=spec.id, n_ctx=512))
        return engines[-1]

    def broken_step() -> None:  # what a llama.cpp failure inside the worker looks like to it
        raise RuntimeError("llama_decode: GGML_ASSERT(test-injected) failed")

    app = make_app(loader=loader, specs=[ModelSpec(id="smol", path=demo_model)])
    with TestClient(app, raise_server_exceptions=False) as client:
        first = client.post("/v1/completions", json=BODY)
        assert first.status_code == 200, first.text
        monkeypatch.setattr(engines[0].scheduler, "_step", broken_step)
        # the request the worker dies under ends with a sanitised engine error
        dying = client.post("/v1/completions", json=BODY)
        assert dying.status_code == 500 and "GGML" not in dying.text
        assert engines[0].failure is not None
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["failed"] == ["smol"]
        refused = client.post("/v1/completions", json=BODY)
        assert refused.status_code == 503 and "GGML" not in refused.text
        assert refused.json()["error"]["code"] == "model_failed"
        wait_until(lambda: client.get("/health").status_code == 200, timeout=60,
                   what="the reload")
        again = client.post("/v1/completions", json=BODY)
        assert again.status_code == 200, again.text
        # a fresh engine, as good as the first (greedy: the same text)
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert len(engines) == 2 and engines[1].failure is None
    logged = [r for r in caplog.records
              if r.levelno == logging.ERROR and "test-injected" in r.getMessage()]
    assert len(logged) == 1
