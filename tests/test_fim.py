"""Fill-in-the-middle: the prompt layout (pure, with a character tokenizer) and the routes
(/v1/completions' ``suffix``, /infill) with the FakeEngine. The real model: test_choices_real."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.engine.fim import (
    CHUNK_SEPARATOR,
    CURRENT_FILE,
    PROJECT,
    ExtraFile,
    FimTokens,
    infill_prompt,
)
from tests.fakes import FakeEngine

PRE, SUF, MID, REP, SEP, BOS = 1001, 1002, 1003, 1004, 1005, 1006


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_prefix_suffix_middle() -> None:
    fim = FimTokens(PRE, SUF, MID)
    assert infill_prompt(fim, chars, prefix="ab", suffix="c", prompt="x") == [
        PRE, *chars("abx"), SUF, *chars("c"), MID]


def test_bos_goes_after_the_extra_context() -> None:
    fim = FimTokens(PRE, SUF, MID, bos=BOS)
    extra = [ExtraFile("e", "f.py")]
    assert infill_prompt(fim, chars, prefix="a", suffix="b", extra=extra) == [
        *chars(CHUNK_SEPARATOR + "e"), BOS, PRE, *chars("a"), SUF, *chars("b"), MID]


def test_repository_and_file_separators() -> None:
    fim = FimTokens(PRE, SUF, MID, rep=REP, sep=SEP)
    extra = [ExtraFile("one", "a.py"), ExtraFile("two")]
    assert infill_prompt(fim, chars, prefix="p", suffix="s", extra=extra) == [
        REP, *chars(PROJECT), SEP, *chars("a.py\n"), *chars("one"), SEP, *chars("tmp\n"),
        *chars("two"), SEP, *chars(CURRENT_FILE), PRE, *chars("p"), SUF, *chars("s"), MID]


FIM = FimTokens(PRE, SUF, MID)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(fim=FIM)


@pytest.fixture
def client(make_app: Callable[..., Starlette], engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(make_app(engine), raise_server_exceptions=False) as c:
        yield c


def test_completions_suffix_builds_a_fim_prompt(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/completions", json={"prompt": "def f(", "suffix": "x)"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "Hello, world!"
    assert list(engine.requests[0].prompt_tokens) == [PRE, *chars("def f("), SUF, *chars("x)"),
                                                       MID]


def test_empty_suffix_is_a_plain_completion(client: TestClient, engine: FakeEngine) -> None:
    client.post("/v1/completions", json={"prompt": "ab", "suffix": ""})
    assert list(engine.requests[0].prompt_tokens) == chars("ab")


def test_infill_takes_llama_servers_fields(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/infill", json={
        "input_prefix": "a", "input_suffix": "b", "prompt": "c",
        "input_extra": [{"filename": "u.py", "text": "u"}], "n_predict": 4,
    })
    assert r.status_code == 200, r.text
    assert r.json()["content"] == "Hello, world!"
    assert list(engine.requests[0].prompt_tokens) == [
        *chars(CHUNK_SEPARATOR + "u"), PRE, *chars("ac"), SUF, *chars("b"), MID]


def test_infill_streams(client: TestClient) -> None:
    r = client.post("/infill", json={"input_prefix": "a", "input_suffix": "b", "stream": True})
    assert r.status_code == 200 and '"stop":true' in r.text


@pytest.mark.parametrize(("path", "body", "param"), [
    pytest.param("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix", id="suffix"),
    pytest.param("/v1/completions", {"prompt": "a", "suffix": "b", "stream": True}, "suffix",
                 id="suffix-streamed"),
    pytest.param("/infill", {"input_prefix": "a", "input_suffix": "b"}, "input_suffix",
                 id="infill"),
])
def test_a_model_without_fim_tokens_is_400(
    make_app: Callable[..., Starlette], path: str, body: dict[str, Any], param: str
) -> None:
    engine = FakeEngine()  # fim None, like SmolLM2
    with TestClient(make_app(engine), raise_server_exceptions=False) as c:
        r = c.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "fim_not_supported" and error["param"] == param
    assert "FIM tokens" in error["message"]
    assert engine.requests == []


@pytest.mark.parametrize("body", [
    pytest.param({"input_prefix": 5}, id="prefix-number"),
    pytest.param({"input_extra": [{"filename": "x"}]}, id="extra-without-text"),
    pytest.param({"input_extra": "x"}, id="extra-string"),
])
def test_bad_infill_fields_are_400(client: TestClient, body: dict[str, Any]) -> None:
    r = client.post("/infill", json=body)
    assert r.status_code == 400, r.text
