"""Embeddings and rerank without llama.cpp: the pure decisions (pooling.py), the wire models, and
every route family against a FakeEmbedder (shapes, order, normalisation, base64, errors, 503)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve.config import ModelSpec, load_config
from llmserve.engine.pooling import (
    gguf_pooling,
    has_rank_head,
    is_embedding_gguf,
    normalise,
    rerank_tokens,
    take_batch,
)
from llmserve.protocol.embeddings import as_list
from tests.fake_embedder import FakeEmbedder
from tests.fakes import FakeEngine

# -- pooling.py ------------------------------------------------------------------------------


@pytest.mark.parametrize(("lengths", "max_tokens", "max_seqs", "expected"), [
    ([3, 3, 3], 10, 8, 3),
    ([3, 3, 3], 6, 8, 2),
    ([3, 3, 3], 100, 2, 2),
    ([10, 1], 10, 8, 1),
    ([], 10, 8, 0),
    ([5], 5, 1, 1),
], ids=["all-fit", "tokens-bound", "seqs-bound", "first-fills", "none", "exact"])
def test_take_batch(lengths: list[int], max_tokens: int, max_seqs: int, expected: int) -> None:
    assert take_batch(lengths, max_tokens, max_seqs) == expected


def test_normalise_modes() -> None:
    v = np.array([3.0, -4.0], dtype=np.float32)
    assert np.allclose(normalise(v, -1), v)
    assert np.allclose(normalise(v, 2), [0.6, -0.8])
    assert np.isclose(np.linalg.norm(normalise(v, 2)), 1.0)
    assert np.allclose(normalise(v, 0), [3 * 32760 / 4, -32760])  # max-abs to the int16 range
    assert np.allclose(normalise(v, 1), [3 / 7, -4 / 7])  # p-norm, p = 1
    assert np.allclose(normalise(np.zeros(3, dtype=np.float32), 2), 0)
    rows = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)  # per token: row by row
    assert np.allclose(np.linalg.norm(normalise(rows, 2), axis=1), 1.0)


def test_rerank_tokens_follow_llama_server() -> None:
    assert rerank_tokens([5, 6], [7], bos=1, eos=2, sep=3) == [1, 5, 6, 2, 3, 7, 2]
    assert rerank_tokens([5], [7], bos=1, eos=None, sep=3) == [1, 5, 3, 7]


def test_embedding_gguf_detection() -> None:
    bert = {"general.architecture": "bert"}
    assert is_embedding_gguf(bert) and gguf_pooling(bert) is None
    assert gguf_pooling({"general.architecture": "qwen3", "qwen3.pooling_type": 4}) == "rank"
    assert is_embedding_gguf({"general.architecture": "qwen3", "qwen3.pooling_type": 1})
    assert not is_embedding_gguf({"general.architecture": "llama"})
    assert has_rank_head(["cls.output.weight"]) and not has_rank_head(["token_embd.weight"])


@pytest.mark.parametrize(("value", "expected"), [
    ("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]]),
], ids=["string", "strings", "tokens", "token-lists"])
def test_input_forms(value: Any, expected: list[Any]) -> None:
    assert as_list(value) == expected


def test_models_toml_embedding_keys(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "models.toml").write_text(
        '[models.emb]\npath = "m.gguf"\nembedding = true\npooling = "mean"\n'
        '[models.chat]\npath = "m.gguf"\n')
    config, _, _ = load_config(tmp_path / "models.toml")
    assert config.models["emb"].embedding is True and config.models["emb"].pooling == "mean"
    assert ModelSpec(id="x", path=tmp_path / "m.gguf", pooling="cls").serves_embeddings()
    assert not ModelSpec(id="x", path=tmp_path / "m.gguf", embedding=False).serves_embeddings()
    (tmp_path / "bad.toml").write_text('[models.e]\npath = "m.gguf"\npooling = "max"\n')
    with pytest.raises(Exception, match="pooling"):
        load_config(tmp_path / "bad.toml")


# -- routes against a FakeEmbedder ---------------------------------------------------------------


@pytest.fixture
def embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
def api(make_app: Callable[..., Starlette], embedder: FakeEmbedder) -> Iterator[TestClient]:
    with TestClient(make_app(embedder), raise_server_exceptions=False) as c:
        yield c


def test_openai_embeddings_in_order_unit_length(api: TestClient, embedder: FakeEmbedder) -> None:
    texts = [f"text {i}" for i in range(32)]
    r = api.post("/v1/embeddings", json={"input": texts, "model": "fake-embed"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == list(range(32))
    for text, item in zip(texts, body["data"], strict=True):
        expected = embedder.vector(embedder.tokenize(text))
        assert np.allclose(item["embedding"], expected / np.linalg.norm(expected), atol=1e-6)
    assert body["usage"]["prompt_tokens"] == sum(len(embedder.tokenize(t)) for t in texts)
    assert body["object"] == "list" and body["model"] == "fake-embed"


def test_base64_equals_float(api: TestClient) -> None:
    f = api.post("/v1/embeddings", json={"input": ["a", "b"]}).json()
    b = api.post("/v1/embeddings", json={"input": ["a", "b"], "encoding_format": "base64"}).json()
    for fd, bd in zip(f["data"], b["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(bd["embedding"]), dtype="<f4")
        assert np.allclose(decoded, fd["embedding"])


def test_token_inputs(api: TestClient, embedder: FakeEmbedder) -> None:
    one = api.post("/v1/embeddings", json={"input": [1, 40, 41]}).json()["data"]
    many = api.post("/v1/embeddings", json={"input": [[1, 40, 41], [1, 42]]}).json()["data"]
    assert len(one) == 1 and len(many) == 2
    assert np.allclose(one[0]["embedding"], many[0]["embedding"])
    assert embedder.calls[-1] == [[1, 40, 41], [1, 42]]  # token arrays taken as they are


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": ""}, "input", None),
    ({"input": []}, "input", None),
    ({"input": ["a", ""]}, "input[1]", None),
    ({"input": [[1, 2], []]}, "input[1]", None),
    ({"input": "x" * 40}, "input", "context_length_exceeded"),
    ({"input": [1, 500]}, "input", None),
    ({"input": "a", "dimensions": 4}, "dimensions", "unsupported_parameter"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", None),
    ({"input": "a", "normalize": -2}, "normalize", None),
    ({"input": {"text": "a"}}, "input", None),
    ({}, "input", None),
], ids=["empty-string", "empty-list", "empty-item", "empty-tokens", "too-long", "bad-token",
        "dimensions", "format", "normalize", "object", "missing"])
def test_bad_embedding_requests(api: TestClient, body: dict[str, Any], param: str,
                                code: str | None) -> None:
    r = api.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_truncate_and_matching_dimensions(api: TestClient) -> None:
    r = api.post("/v1/embeddings", json={"input": "x" * 40, "truncate": True, "dimensions": 8})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == 16


def test_llamacpp_embedding_normalize(api: TestClient, embedder: FakeEmbedder) -> None:
    raw = embedder.vector(embedder.tokenize("hello"))
    for mode, expected in ((-1, raw), (2, raw / np.linalg.norm(raw)),
                           (0, raw * 32760 / np.abs(raw).max())):
        r = api.post("/embedding", json={"content": "hello", "normalize": mode})
        assert r.status_code == 200, r.text
        (item,) = r.json()
        assert item["index"] == 0
        assert np.allclose(item["embedding"][0], expected, rtol=1e-5)
    assert api.post("/embedding", json={}).status_code == 400


def test_pooling_none(make_app: Callable[..., Starlette]) -> None:
    fake = FakeEmbedder(pooling="none")
    with TestClient(make_app(fake), raise_server_exceptions=False) as api:
        r = api.post("/embedding", json={"content": ["hi", "abc"]})
        assert r.status_code == 200
        rows = [item["embedding"] for item in r.json()]
        assert [len(x) for x in rows] == [3, 4]  # per token, CLS included
        assert all(np.isclose(np.linalg.norm(t), 1.0) for x in rows for t in x)
        r = api.post("/v1/embeddings", json={"input": "hi"})
        assert r.status_code == 400 and "pooling none" in r.json()["error"]["message"]


def test_ollama_routes(api: TestClient, embedder: FakeEmbedder) -> None:
    r = api.post("/api/embed", json={"model": "fake-embed", "input": ["a", "b"]})
    assert r.status_code == 200
    body = r.json()
    assert len(body["embeddings"]) == 2 and body["prompt_eval_count"] == 4
    assert np.isclose(np.linalg.norm(body["embeddings"][0]), 1.0)
    # Ollama truncates by default; /api/embed with truncate false refuses
    assert api.post("/api/embed", json={"input": "x" * 40}).status_code == 200
    assert api.post("/api/embed", json={"input": "x" * 40, "truncate": False}).status_code == 400
    legacy = api.post("/api/embeddings", json={"model": "fake-embed", "prompt": "a"}).json()
    assert np.allclose(legacy["embedding"], embedder.vector(embedder.tokenize("a")))
    assert api.post("/api/embeddings", json={"prompt": ""}).status_code == 400


def test_lmstudio_route(api: TestClient) -> None:
    r = api.post("/api/v0/embeddings", json={"input": "a"})
    assert r.status_code == 200 and len(r.json()["data"]) == 1


def test_chat_model_refuses_embeddings(make_app: Callable[..., Starlette]) -> None:
    with TestClient(make_app(FakeEngine()), raise_server_exceptions=False) as api:
        r = api.post("/v1/embeddings", json={"input": "a"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "wrong_model_kind"
        assert "--embedding" in r.json()["error"]["message"]
        assert api.post("/v1/rerank", json={"query": "q", "documents": ["d"]}).status_code == 400


def test_embedding_model_refuses_chat(api: TestClient) -> None:
    r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "wrong_model_kind"


# -- rerank ----------------------------------------------------------------------------------------


@pytest.fixture
def ranker_api(make_app: Callable[..., Starlette]) -> Iterator[TestClient]:
    with TestClient(make_app(FakeEmbedder(pooling="rank", model_id="ranker")),
                    raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_rerank_sorted_top_n(ranker_api: TestClient, path: str) -> None:
    docs = ["zzz", "abcd", {"text": "ab"}, "abc"]
    r = ranker_api.post(path, json={"query": "abcd", "documents": docs, "top_n": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [1, 3, 2]
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    assert results[2]["document"] == {"text": "ab"}
    bare = ranker_api.post(path, json={"query": "abcd", "documents": docs,
                                       "return_documents": False}).json()["results"]
    assert len(bare) == 4 and "document" not in bare[0]


@pytest.mark.parametrize(("body", "param"), [
    ({"query": "", "documents": ["a"]}, "query"),
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "q", "documents": ["a", ""]}, "documents[1]"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ({"query": "q", "documents": ["x" * 40]}, "documents[0]"),
], ids=["empty-query", "no-documents", "empty-document", "top-n", "too-long"])
def test_bad_rerank_requests(ranker_api: TestClient, body: dict[str, Any], param: str) -> None:
    r = ranker_api.post("/v1/rerank", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_rerank_without_rank_head(api: TestClient) -> None:
    r = api.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
    assert r.status_code == 400
    assert "no rank head" in r.json()["error"]["message"]
    # and a reranker does not embed
    assert api.post("/v1/embeddings", json={"input": "a"}).status_code == 200


def test_reranker_refuses_embeddings(ranker_api: TestClient) -> None:
    r = ranker_api.post("/v1/embeddings", json={"input": "a"})
    assert r.status_code == 400 and "reranker" in r.json()["error"]["message"]


# -- admission -------------------------------------------------------------------------------------


async def test_queue_full_is_503(make_app: Callable[..., Starlette]) -> None:
    gate = asyncio.Event()
    fake = FakeEmbedder(gate=gate)
    app = make_app(fake, max_queue=0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first = asyncio.create_task(client.post("/v1/embeddings", json={"input": "a"}))
        async with asyncio.timeout(10):
            while fake.entered == 0:
                await asyncio.sleep(0.01)
        busy = await client.post("/v1/embeddings", json={"input": "b"})
        assert busy.status_code == 503
        assert busy.headers["retry-after"]
        assert json.loads(busy.text)["error"]["code"] == "server_busy"
        gate.set()
        assert (await first).status_code == 200
        # the place is given back
        assert (await client.post("/v1/embeddings", json={"input": "c"})).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/api/v0/models", "/api/ps", "/props",
                                  "/slots", "/metrics"])
def test_reads_work_with_an_embedding_model(api: TestClient, path: str) -> None:
    r = api.get(path)
    assert r.status_code == 200, r.text


def test_lmstudio_lists_an_embedding_model_as_such(api: TestClient) -> None:
    (card,) = api.get("/api/v0/models").json()["data"]
    assert card["type"] == "embeddings"


# -- `llmserve embed` without a server -----------------------------------------------------------


@pytest.mark.parametrize(("args", "says", "code"), [
    # as every client command: 2 when no server answers (the shared client's exit codes)
    (["--url", "http://127.0.0.1:1", "hello"], "no server answers", 2),
    (["--format", "xml", "hello"], "--format", 1),
    (["--model", "x.gguf", "--pooling", "max", "hello"], "--pooling", 1),
    (["--model", "/nonexistent/x.gguf", "hello"], "not found", 1),
], ids=["unreachable", "format", "pooling", "missing-file"])
def test_embed_cli_errors_are_one_line(args: list[str], says: str, code: int) -> None:
    from typer.testing import CliRunner

    from llmserve import cli

    r = CliRunner().invoke(cli.app, ["embed", *args])
    assert r.exit_code == code
    assert says in r.output and "Traceback" not in r.output


def test_embed_client_formats() -> None:
    import io

    from llmserve.embed_client import write

    rows = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    out = io.BytesIO()
    write(rows, "json", out)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == rows.tolist()
    out = io.BytesIO()
    write(rows, "npy", out)
    assert np.array_equal(np.load(io.BytesIO(out.getvalue())), rows)
