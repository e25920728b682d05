"""Tier 1: which grammars make an ignore_eos request a certain dead end (grammar_bound), and
tier 2: the routes that take a grammar refuse one with a 400 before anything is generated."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.engine.grammar_bound import check_can_end, max_text_bytes
from llmserve.engine.types import GenerationRequest, SamplingParams
from llmserve.errors import GrammarDeadEnd
from tests.fakes import FakeEngine


@pytest.mark.parametrize(("grammar", "longest"), [
    ('root ::= "a"', 1),
    ('root ::= "yes" | "no"', 3),
    ('root ::= ("yes" | "no") "."', 4),
    ('root ::= [a-z]{2,5}', 5),
    ('root ::= "a"{3}', 3),
    ('root ::= "a"{0}', 0),
    ('root ::= ""', 0),
    ('root ::= x x\nx ::= "ab" # a comment\n', 4),
    ('root ::= (\n  "a"\n  | "bc"\n)', 2),
    ('root ::= "\\u00e9" "€"', 5),
    ('root ::= [^x]', 4),
    ('root ::= .?', 4),
    ('root ::= [\\x00-\\U0010FFFF]', 4),
    ('root ::= "a" [\\]]', 2),
    # unbounded, or not read: no verdict
    ('root ::= [a-z]+', None),
    ('root ::= "a"*', None),
    ('root ::= "a"{2,}', None),
    ('root ::= root "a" | "b"', None),
    ('root ::= a\na ::= b\nb ::= a', None),
    ('root ::= <[1]>', None),
    ('main ::= "a"', None),
    ("root ::= " + "(" * 5000 + '"a"' + ")" * 5000, None),
], ids=repr)
def test_max_text_bytes(grammar: str, longest: int | None) -> None:
    assert max_text_bytes(grammar) == longest


def _request(grammar: str, *, max_tokens: int, ignore_eos: bool = True,
             stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(prompt_tokens=[1], max_tokens=max_tokens, stop=stop,
                             sampling=SamplingParams(grammar=grammar, ignore_eos=ignore_eos))


def test_check_can_end() -> None:
    with pytest.raises(GrammarDeadEnd) as dead:
        check_can_end(_request('root ::= "yes" | "no"', max_tokens=4))
    assert dead.value.status == 400 and dead.value.param == "grammar"
    assert "ignore_eos" in dead.value.message and "3 bytes" in dead.value.message
    check_can_end(_request('root ::= "yes" | "no"', max_tokens=3))  # max_tokens can end it
    check_can_end(_request('root ::= "a"', max_tokens=9, ignore_eos=False))
    check_can_end(_request('root ::= "a"', max_tokens=9, stop=("a",)))  # a stop string can
    check_can_end(_request('root ::= "a"+', max_tokens=9))


GRAMMAR = 'root ::= "a"'


@pytest.mark.parametrize(("path", "body"), [
    ("/completion", {"prompt": "hi", "grammar": GRAMMAR, "ignore_eos": True}),
    ("/completion", {"prompt": "hi", "grammar": GRAMMAR, "ignore_eos": True, "stream": True}),
    ("/v1/completions", {"prompt": "hi", "grammar": GRAMMAR, "ignore_eos": True,
                         "max_tokens": 8}),
    ("/v1/completions", {"prompt": "hi", "grammar": GRAMMAR, "ignore_eos": True,
                         "max_tokens": 8, "stream": True}),
    ("/api/v1/generate", {"prompt": "hi", "grammar": GRAMMAR, "bypass_eos": True}),
    ("/api/extra/generate/stream", {"prompt": "hi", "grammar": GRAMMAR, "bypass_eos": True}),
], ids=lambda v: v if isinstance(v, str) else ("stream" if v.get("stream") else "-"))
def test_routes_refuse_a_dead_end_grammar_before_generating(
    make_app: Callable[..., Starlette], path: str, body: dict[str, Any]
) -> None:
    engine = FakeEngine()
    with TestClient(make_app(engine), raise_server_exceptions=False) as c:
        r = c.post(path, json=body)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json"
        error = json.loads(r.text)["error"]
        assert error["code"] == "grammar_dead_end" and error["param"] == "grammar"
        assert engine.requests == []  # nothing reached the engine's queue
        ok = c.post(path, json={k: v for k, v in body.items()
                                if k not in ("ignore_eos", "bypass_eos")})
        assert ok.status_code == 200, ok.text
