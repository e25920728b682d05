"""Tier 3: embeddings and rerank on real llama.cpp — tiny random-weight BERT GGUFs written by the
tests (tests/embed_fixtures.py, with and without a rank head) and the demo model with pooling
mean — in-process, behind `llmserve run`, through the openai SDK and the `llmserve embed` CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from llmserve.errors import ModelLoadError
from tests.conftest import ServerProcess
from tests.embed_fixtures import write_bert

pytestmark = pytest.mark.real

TEXTS = [f"the {w} is {i}" for i, w in enumerate(
    ["cat", "dog", "paris", "capital", "world", "hello", "france", "a"] * 4)]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """A models dir: the demo chat model, an embedding BERT and a BERT reranker."""
    folder = tmp_path_factory.mktemp("models")
    write_bert(folder / "bert.gguf")
    write_bert(folder / "ranker.gguf", rank_head=True, seed=1)
    (folder / "smollm2.gguf").symlink_to(demo_model)
    return folder


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# -- the engine in-process -----------------------------------------------------------------------


def test_embedder_batches_equal_one_by_one(ggufs: Path) -> None:
    from llmserve.engine.embedder import Embedder

    engine = Embedder.load(ggufs / "bert.gguf", n_ctx=512)
    try:
        info = engine.info.embedding
        assert info is not None and info.pooling == "mean" and info.n_embd == 32

        async def run() -> tuple[list[np.ndarray], list[np.ndarray], list[list[np.ndarray]]]:
            seqs = [engine.tokenize(t) for t in TEXTS * 10]  # 320 inputs: over 256 per decode
            batched = await engine.embed(seqs)
            alone = [(await engine.embed([s]))[0] for s in seqs[:len(TEXTS)]]
            clients = await asyncio.gather(*[engine.embed([s]) for s in seqs[:len(TEXTS)]])
            return batched, alone, clients

        batched, alone, clients = asyncio.run(run())
        for i, single in enumerate(alone):
            assert np.allclose(batched[i], single, atol=1e-4)
            assert np.allclose(batched[i + len(TEXTS) * 9], single, atol=1e-4)
            assert np.allclose(clients[i][0], single, atol=1e-4)
        assert np.isclose(float(_unit(alone[0]) @ _unit(alone[0])), 1.0, atol=1e-6)
        assert not np.allclose(alone[0], alone[1])
    finally:
        engine.close()


def test_a_dying_worker_fails_its_requests(ggufs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmserve.engine.embedder import Embedder
    from llmserve.errors import ModelFailed

    engine = Embedder.load(ggufs / "bert.gguf", n_ctx=512)

    def broken(self: Embedder, taken: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Embedder, "_decode", broken)
    try:
        with pytest.raises(ModelFailed):
            asyncio.run(asyncio.wait_for(engine.embed([[2, 4, 3]]), 30))
        assert isinstance(engine.failure, RuntimeError)  # the registry reloads the model
        with pytest.raises(ModelFailed):
            asyncio.run(engine.embed([[2, 4, 3]]))
    finally:
        engine.close()


def test_rank_pooling_needs_a_rank_head(ggufs: Path) -> None:
    from llmserve.engine.embedder import Embedder

    # llama.cpp would abort the process on this; llmserve refuses it first
    with pytest.raises(ModelLoadError, match="rank"):
        Embedder.load(ggufs / "bert.gguf", n_ctx=512, pooling="rank")


def test_demo_model_embeds_as_llama_cpp_python(demo_model: Path) -> None:
    """The same context shape and the same decodes as ``Llama(embedding=True).embed``, hence
    the same vectors: what bench/embeddings.py compares is then only the serving around them."""
    import llama_cpp

    from llmserve.engine.embedder import Embedder
    from llmserve.engine.pooling import normalise

    n_ctx = 128  # 32 texts of ~7 tokens: two decodes on each side
    engine = Embedder.load(demo_model, n_ctx=n_ctx, n_threads=1, pooling="mean", n_gpu_layers=0)
    llama = llama_cpp.Llama(
        str(demo_model), embedding=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
        n_threads=1, n_threads_batch=1, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        flash_attn=False, n_gpu_layers=0, verbose=False)
    try:
        for read in (llama_cpp.llama_n_ctx, llama_cpp.llama_n_batch, llama_cpp.llama_n_ubatch,
                     llama_cpp.llama_n_seq_max, llama_cpp.llama_n_threads_batch):
            assert read(engine.model.ctx) == read(llama.ctx), read.__name__

        async def run() -> list[np.ndarray]:
            return await engine.embed([engine.tokenize(t) for t in TEXTS])

        ours = np.array([normalise(v, 2) for v in asyncio.run(run())])
        theirs = np.array(llama.embed(TEXTS, normalize=True))
        assert ours.shape == theirs.shape == (len(TEXTS), 576)
        assert np.allclose(ours, theirs, atol=1e-5)
    finally:
        llama.close()
        engine.close()


# -- behind `llmserve run` -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dir_server(ggufs: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(["--models-dir", str(ggufs), "--max-loaded-models", "3",
                            "--ctx-size", "512", "--max-queue", "64", "smollm2"])
    yield server
    server.stop()


def test_sdk_chat_and_embeddings_from_one_server(dir_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=dir_server.url + "/v1", api_key="x", max_retries=0)
    chat = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4,
        temperature=0)
    assert chat.choices[0].message.content
    floats = client.embeddings.create(model="bert", input=TEXTS[:3], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert floats.usage.prompt_tokens > 0
    for d in floats.data:
        assert len(d.embedding) == 32
        assert np.isclose(np.linalg.norm(d.embedding), 1.0, atol=1e-4)
    raw = client.embeddings.create(model="bert", input=TEXTS[:3], encoding_format="base64")
    for f, b in zip(floats.data, raw.data, strict=True):
        assert isinstance(b.embedding, str)
        decoded = np.frombuffer(base64.b64decode(b.embedding), dtype="<f4")
        assert np.allclose(decoded, f.embedding, atol=1e-6)
    # the SDK's default asks for base64 and decodes it itself
    default = client.embeddings.create(model="bert", input=TEXTS[0])
    assert np.allclose(default.data[0].embedding, floats.data[0].embedding, atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="bert", input="hello", dimensions=8)


def test_32_inputs_in_order(dir_server: ServerProcess) -> None:
    many = httpx.post(dir_server.url + "/v1/embeddings",
                      json={"model": "bert", "input": TEXTS}, timeout=60)
    assert many.status_code == 200, many.text
    data = many.json()["data"]
    assert len(data) == 32 and [d["index"] for d in data] == list(range(32))
    for text, item in zip(TEXTS[:6], data, strict=False):
        one = httpx.post(dir_server.url + "/v1/embeddings",
                         json={"model": "bert", "input": text}, timeout=60).json()
        assert np.allclose(one["data"][0]["embedding"], item["embedding"], atol=1e-4)


def test_llamacpp_and_ollama_routes(dir_server: ServerProcess) -> None:
    url = dir_server.url
    raw = httpx.post(url + "/embedding", json={"model": "bert", "content": "hello",
                                               "normalize": -1}, timeout=60).json()
    unit = httpx.post(url + "/embedding", json={"model": "bert", "content": "hello"},
                      timeout=60).json()
    assert np.allclose(_unit(np.array(raw[0]["embedding"][0])), unit[0]["embedding"][0],
                       atol=1e-4)
    ollama = httpx.post(url + "/api/embed", json={"model": "bert", "input": ["hello"]},
                        timeout=60).json()
    assert np.allclose(ollama["embeddings"][0], unit[0]["embedding"][0], atol=1e-4)
    long = "hello " * 600
    too_long = httpx.post(url + "/v1/embeddings", json={"model": "bert", "input": long},
                          timeout=60)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(url + "/v1/embeddings", json={"model": "bert", "input": long,
                                                    "truncate": True}, timeout=60
                      ).status_code == 200


def test_rerank(dir_server: ServerProcess) -> None:
    docs = ["the capital of france is paris", "a dog", "hello world", "cat", "paris"]
    r = httpx.post(dir_server.url + "/v1/rerank", json={
        "model": "ranker", "query": "capital of france", "documents": docs, "top_n": 3,
    }, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    everything = httpx.post(dir_server.url + "/rerank", json={
        "model": "ranker", "query": "capital of france", "documents": docs,
    }, timeout=60).json()["results"]
    assert sorted(x["index"] for x in everything) == list(range(5))
    assert [x["index"] for x in everything[:3]] == [x["index"] for x in results]
    assert everything[0]["document"]["text"] == docs[everything[0]["index"]]
    no_head = httpx.post(dir_server.url + "/v1/rerank", json={
        "model": "bert", "query": "q", "documents": ["a"]}, timeout=60)
    assert no_head.status_code == 400
    assert "no rank head" in no_head.json()["error"]["message"]


# -- the demo model with pooling mean, and the CLI -----------------------------------------------


@pytest.fixture(scope="module")
def demo_mean(demo_model: Path) -> Iterator[ServerProcess]:
    server = ServerProcess([str(demo_model), "--pooling", "mean", "--ctx-size", "512"])
    yield server
    server.stop()


def test_demo_model_pooling_mean(demo_mean: ServerProcess) -> None:
    r = httpx.post(demo_mean.url + "/v1/embeddings", json={"input": TEXTS}, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 32 and [d["index"] for d in data] == list(range(32))
    assert len(data[0]["embedding"]) == 576
    for i in (0, 13, 31):
        one = httpx.post(demo_mean.url + "/v1/embeddings", json={"input": TEXTS[i]},
                         timeout=60).json()["data"][0]["embedding"]
        assert np.allclose(one, data[i]["embedding"], atol=1e-4)
    chat = httpx.post(demo_mean.url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "wrong_model_kind"


def _cli(*args: str, stdin: str = "", env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "llmserve", "embed", *args],
                          input=stdin.encode(), capture_output=True, timeout=120,
                          env={**os.environ, **(env or {})}, check=False)


def test_embed_cli(demo_mean: ServerProcess, ggufs: Path) -> None:
    done = _cli("--url", demo_mean.url, stdin="hello\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 1
    vector = json.loads(lines[0])
    assert len(vector) == 576 and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-4)
    by_env = _cli("hello", "world", env={"LLMSERVE_URL": demo_mean.url + "/v1"})
    assert by_env.returncode == 0, by_env.stderr
    assert np.allclose(json.loads(by_env.stdout.decode().splitlines()[0]), vector, atol=1e-4)
    npy = _cli("--url", demo_mean.url, "--format", "npy", "a", "b", "c")
    assert npy.returncode == 0
    import io
    assert np.load(io.BytesIO(npy.stdout)).shape == (3, 576)
    local = _cli("--model", str(ggufs / "bert.gguf"), "hello")
    assert local.returncode == 0, local.stderr
    assert len(json.loads(local.stdout.decode())) == 32
    bad = _cli("--url", demo_mean.url, stdin="hello\n\n")
    assert bad.returncode != 0 and b"empty" in bad.stderr


# -- chat and embeddings side by side --------------------------------------------------------------


def test_chat_and_embeddings_do_not_share_a_queue(tmp_path: Path, demo_model: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(f'[models.chat]\npath = "{demo_model}"\n\n'
                      f'[models.embed]\npath = "{demo_model}"\nembedding = true\n'
                      'pooling = "mean"\n')
    server = ServerProcess(["--config", str(config), "--max-loaded-models", "2",
                            "--max-queue", "0", "--ctx-size", "512", "chat"])
    try:
        url = server.url
        warm = httpx.post(url + "/v1/embeddings", json={"model": "embed", "input": "hi"},
                          timeout=120)
        assert warm.status_code == 200, warm.text
        body = {"model": "chat", "messages": [{"role": "user", "content": "Count to 100"}],
                "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=120) as client, client.stream(
                "POST", url + "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it is generating
            # the chat model's one slot is taken and it has no queue: another chat waits
            # nowhere, it is refused ...
            assert client.post(url + "/v1/chat/completions", json={
                **body, "stream": False, "max_tokens": 1}).status_code == 503
            # ... while the embedding model answers at once, from its own queue
            r = client.post(url + "/v1/embeddings",
                            json={"model": "embed", "input": TEXTS[:8]})
            assert r.status_code == 200, r.text
            assert len(r.json()["data"]) == 8
            # and the chat stream was still running all along
            assert any(line.startswith("data: {") for line in lines)
        statuses = httpx.get(url + "/v1/models", timeout=30).json()["data"]
        assert {m["id"] for m in statuses} >= {"chat", "embed"}
    finally:
        server.stop()
