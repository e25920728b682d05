"""Tiers 1-2: LoRA adapters without a model — `--lora PATH[:SCALE]`, models.toml's
``lora = [{path, scale}]``, a request's ``lora`` list through the one normaliser, adapter sets,
and the adapter routes' refusals of bad bodies."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from llmserve import cli
from llmserve.config import LoraSpec, Settings, resolve_settings
from llmserve.errors import InvalidRequest
from llmserve.params import normalise
from llmserve.protocol import llamacpp
from llmserve.protocol import openai as oa
from llmserve.server.requests import validate


@pytest.mark.parametrize("text, path, scale", [
    ("a.gguf", "a.gguf", 1.0),
    ("a.gguf:0.5", "a.gguf", 0.5),
    ("a.gguf:0", "a.gguf", 0.0),
    ("/x/y:z/a.gguf", "/x/y:z/a.gguf", 1.0),  # a colon that is not a scale stays in the path
    ("C:\\lora\\a.gguf:2", "C:\\lora\\a.gguf", 2.0),
])
def test_lora_flag(text: str, path: str, scale: float) -> None:
    assert LoraSpec.parse(text) == LoraSpec(path=Path(path), scale=scale)


def test_lora_in_models_toml(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text('[models.base]\npath = "base.gguf"\n'
                      'lora = [{path = "ad/a.gguf", scale = 0.5}, {path = "b.gguf"}]\n'
                      '[models.other]\npath = "other.gguf"\n')
    values = {**Settings().model_dump(exclude={"models", "sampling", "whisper_models"}),
              "config": config}
    base, other = resolve_settings(values, set()).models
    assert base.lora == [LoraSpec(path=tmp_path / "ad" / "a.gguf", scale=0.5),
                         LoraSpec(path=tmp_path / "b.gguf", scale=1.0)]
    assert other.lora == []


def test_lora_flags_reach_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []
    monkeypatch.setattr(cli, "serve", lambda settings, log_level: seen.append(settings))
    result = CliRunner().invoke(cli.app, ["run", "m.gguf", "--lora", "a.gguf:0",
                                          "--lora", "b.gguf"])
    assert result.exit_code == 0, result.output
    assert seen[0].lora == [LoraSpec(path=Path("a.gguf"), scale=0.0),
                            LoraSpec(path=Path("b.gguf"))]


@pytest.mark.parametrize("model", [oa.ChatCompletionRequest, oa.CompletionRequest,
                                   llamacpp.CompletionRequest])
def test_a_requests_lora_list_reaches_params(model: type) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi",
            "lora": [{"id": 1, "scale": 0.5}, {"id": 0, "scale": 0}]}
    params = normalise(validate(model, body).wire())
    assert params.lora == ((1, 0.5), (0, 0.0))
    body.pop("lora")
    assert normalise(validate(model, body).wire()).lora is None  # the global scales


@pytest.mark.parametrize("lora, param", [
    ([{"id": -1, "scale": 1}], "lora[0].id"),
    ([{"id": 0, "scale": "x"}], "lora[0].scale"),
    ([{"id": 0}], "lora[0].scale"),
    ([{"id": 0, "scale": 1, "alpha": 2}], "lora[0].alpha"),
    ({"id": 0, "scale": 1}, "lora"),
], ids=["negative-id", "bad-scale", "no-scale", "unknown-key", "not-a-list"])
def test_bad_lora_lists_are_400s(lora: object, param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "lora": lora}
    with pytest.raises(InvalidRequest) as caught:
        validate(oa.ChatCompletionRequest, body)
    assert caught.value.param == param


@pytest.mark.parametrize("path, body, param", [
    ("/lora-adapters", [{"id": 0}], "[0].scale"),
    ("/lora-adapters", {"adapters": [{"id": "x", "scale": 1}]}, "[0].id"),
    ("/v1/lora/load", {"scale": 1}, "path"),
    ("/v1/lora/load", {"path": "a.gguf", "scale": "big"}, "scale"),
    ("/v1/lora/unload", {}, ""),
    ("/v1/lora/unload", {"id": 0, "path": "a.gguf"}, ""),
], ids=["no-scale", "bad-id", "no-path", "bad-scale", "unload-nothing", "unload-both"])
def test_adapter_routes_refuse_bad_bodies(client: TestClient, path: str, body: object,
                                          param: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
