"""Tier 2: the load generator behind `llmserve bench`, against real uvicorn servers on free ports —
create_app over a FakeEngine, and a tiny fake peer that streams like a server without usage
chunks. Asserts the report's counts, never its timings."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from typer.testing import CliRunner

from llmserve import loadgen
from llmserve.cli import app as cli_app
from llmserve.errors import BenchError
from llmserve.loadgen import Workload, api_root, percentile, run_workload
from tests.conftest import free_port
from tests.fakes import FakeEngine, Script
from tests.polling import wait_until


class ThreadServer:
    """An ASGI app behind a real uvicorn on 127.0.0.1:<free port>, in a thread."""

    def __init__(self, app: Starlette) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=10, what="uvicorn to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve() -> Iterator[Callable[[Starlette], ThreadServer]]:
    servers: list[ThreadServer] = []

    def start(app: Starlette) -> ThreadServer:
        servers.append(ThreadServer(app))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def llmserve_fake(
    make_app: Callable[..., Starlette], serve: Callable[[Starlette], ThreadServer]
) -> Callable[..., tuple[ThreadServer, FakeEngine]]:
    def start(script: Script | None = None) -> tuple[ThreadServer, FakeEngine]:
        engine = FakeEngine(parallel=2, script=script or Script())
        return serve(make_app(engine, max_queue=16)), engine

    return start


# -- a peer that streams without usage chunks --------------------------------------------------


def fake_peer(*, truncate: bool = False) -> Starlette:
    """Streams one token per chunk up to max_tokens, after an empty role chunk; never sends
    usage (like servers that ignore stream_options). ``truncate`` drops the final [DONE]."""

    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()

        async def events() -> AsyncIterator[bytes]:
            yield b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
            yield b": a comment line\n\n"
            for i in range(body["max_tokens"]):
                chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            if not truncate:
                yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "peer-model", "object": "model"}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/models", models)])


# -- against llmserve over a FakeEngine -------------------------------------------------------


def test_counts_from_usage_and_sends_the_fixed_workload(
    llmserve_fake: Callable[..., tuple[ThreadServer, FakeEngine]],
) -> None:
    server, engine = llmserve_fake()
    report = run_workload(Workload(url=server.url + "/v1", clients=3, requests=5, max_tokens=3))
    assert report.model == "fake-model"
    assert [r.index for r in report.results] == [0, 1, 2, 3, 4]
    assert report.errors == {}
    assert len(report.ok) == 5
    assert (report.completed_tokens, report.requested_tokens, report.full_requests) == (15, 15, 5)
    assert {r.counted_from for r in report.results} == {"usage"}
    assert all(r.text == "Hello, world" for r in report.results)
    assert all(r.ttft is not None for r in report.results)
    # the warm-up request first, then the prompt set in order, each asked for 3 tokens at temp 0
    assert engine.chats[0] == [{"role": "user", "content": "Hello"}]
    assert sorted(c[0]["content"] for c in engine.chats[1:]) == sorted(loadgen.DEFAULT_PROMPTS[:5])
    timed = engine.requests[1:]
    assert {(r.max_tokens, r.sampling.temperature, r.sampling.seed) for r in timed} == {
        (3, 0.0, 42)
    }


def test_short_generations_count_what_was_completed(
    llmserve_fake: Callable[..., tuple[ThreadServer, FakeEngine]],
) -> None:
    server, _ = llmserve_fake(Script(tokens=("a", "b")))
    report = run_workload(Workload(url=server.url, clients=2, requests=3, max_tokens=10,
                                   endpoint="completions", warmup=False))
    assert report.errors == {}
    assert (report.completed_tokens, report.requested_tokens, report.full_requests) == (6, 30, 0)
    data = report.to_dict()
    assert data["completed_tokens"] == 6
    assert data["requested_tokens"] == 30
    assert data["tokens_counted_from"] == "usage"


def test_errors_by_status(llmserve_fake: Callable[..., tuple[ThreadServer, FakeEngine]]) -> None:
    server, _ = llmserve_fake()
    too_long = "x" * 400  # FakeEngine: one token per character, 256-token context
    report = run_workload(Workload(url=server.url, prompts=["hi", too_long], clients=2,
                                   requests=4, max_tokens=3))
    assert report.errors == {"400": 2}
    assert [r.status for r in report.results] == [200, 400, 200, 400]
    assert (report.completed_tokens, report.requested_tokens) == (6, 12)
    assert report.to_dict()["errors"] == {"400": 2}


def test_a_mid_stream_failure_is_a_stream_error(
    llmserve_fake: Callable[..., tuple[ThreadServer, FakeEngine]],
) -> None:
    server, _ = llmserve_fake(Script(fail_at=2))
    report = run_workload(Workload(url=server.url, clients=2, max_tokens=3, warmup=False))
    assert report.errors == {"stream_error": 2}
    assert report.ok == []
    assert report.completed_tokens == 0


# -- against a peer without usage chunks ---------------------------------------------------


def test_counts_content_chunks_when_no_usage_comes(
    serve: Callable[[Starlette], ThreadServer],
) -> None:
    server = serve(fake_peer())
    report = run_workload(Workload(url=server.url, clients=4, requests=6, max_tokens=7))
    assert report.model == "peer-model"
    assert report.errors == {}
    assert {r.counted_from for r in report.results} == {"chunks"}
    assert (report.completed_tokens, report.requested_tokens, report.full_requests) == (42, 42, 6)
    assert all(r.stream_tokens_per_s is not None for r in report.results)


def test_a_stream_without_done_is_truncated(serve: Callable[[Starlette], ThreadServer]) -> None:
    server = serve(fake_peer(truncate=True))
    report = run_workload(Workload(url=server.url, clients=2, max_tokens=3, warmup=False))
    assert report.errors == {"truncated": 2}


def test_an_unreachable_server() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BenchError, match="cannot connect"):
        run_workload(Workload(url=url, clients=1, max_tokens=2, timeout=5))
    report = run_workload(Workload(url=url, clients=2, max_tokens=2, timeout=5, warmup=False))
    assert report.errors == {"connection": 2}
    assert report.ttft(50) is None


# -- the CLI --------------------------------------------------------------------------------


def test_cli_json_is_clean_stdout(
    llmserve_fake: Callable[..., tuple[ThreadServer, FakeEngine]],
) -> None:
    server, _ = llmserve_fake()
    result = CliRunner().invoke(
        cli_app, ["bench", "--url", server.url, "-n", "2", "--requests", "3", "--max-tokens",
                  "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] == 3
    assert data["errors"] == {}
    assert (data["completed_tokens"], data["requested_tokens"]) == (6, 6)
    assert set(data["ttft_s"]) == {"p50", "p95"}


def test_cli_table(serve: Callable[[Starlette], ThreadServer]) -> None:
    server = serve(fake_peer())
    result = CliRunner().invoke(cli_app, ["bench", "--url", server.url, "-n", "2",
                                          "--max-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "10 / 10" in result.stdout
    assert "aggregate tokens/s" in result.stdout


def test_cli_prompt_file(serve: Callable[[Starlette], ThreadServer], tmp_path: Path) -> None:
    server = serve(fake_peer())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\n\nsecond\n", encoding="utf-8")
    result = CliRunner().invoke(cli_app, ["bench", "--url", server.url, "--prompt-file",
                                          str(prompts), "-n", "3", "--max-tokens", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "localhost:1"], "must start with http://"),
        (["--url", "http://127.0.0.1:1", "model.gguf"], "not both"),
        (["--url", "http://127.0.0.1:1", "--endpoint", "embeddings"], "--endpoint"),
        (["--url", "http://127.0.0.1:1", "--prompt-file", "/nonexistent/p.txt"],
         "cannot read the prompt file"),
        (["--url", "http://127.0.0.1:1", "--timeout", "2"], "cannot connect"),
    ],
    ids=["url-without-scheme", "model-and-url", "bad-endpoint", "missing-prompt-file",
         "unreachable"],
)
def test_cli_errors_are_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli_app, ["bench", *args])
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


# -- pure helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([], 50, None), ([3.0], 95, 3.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
     ([4.0, 1.0, 3.0, 2.0], 0, 1.0), ([1.0, 2.0, 3.0, 4.0, 5.0], 95, 4.8)],
    ids=["empty", "one", "median-even", "min-unsorted", "p95"],
)
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    result = percentile(values, q)
    assert result == pytest.approx(expected) if expected is not None else result is None


@pytest.mark.parametrize(
    ("url", "root"),
    [("http://h:1", "http://h:1"), ("http://h:1/", "http://h:1"), ("http://h:1/v1", "http://h:1"),
     ("https://h/v1/", "https://h")],
    ids=["bare", "slash", "v1", "https-v1-slash"],
)
def test_api_root(url: str, root: str) -> None:
    assert api_root(url) == root


# -- tier 3: the server it starts itself --------------------------------------------------------


@pytest.mark.real
@pytest.mark.timeout(300)
def test_cli_serves_a_model_itself_and_stops_it(demo_model: Path) -> None:
    result = CliRunner().invoke(cli_app, ["bench", str(demo_model), "-n", "2", "--max-tokens",
                                          "4", "--threads", "2", "--ctx-size", "1024", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == demo_model.stem
    assert (data["ok"], data["errors"], data["requested_tokens"]) == (2, {}, 8)
    assert data["tokens_counted_from"] == "usage"
    assert 2 <= data["completed_tokens"] <= 8
    port = int(data["url"].rsplit(":", 1)[1])
    with pytest.raises(httpx.ConnectError):  # stopped afterwards
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
