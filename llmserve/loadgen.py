"""The load generator behind ``llmserve bench`` and the bench/ scripts.

An HTTP client only: it drives any OpenAI-compatible server (llmserve, llama-cpp-python's server,
llama.cpp's llama-server) with the same workload — N concurrent streaming clients over a fixed,
deterministic prompt set, a fixed ``max_tokens``, greedy sampling (temperature 0, no repeat
penalty) and a fixed seed — and reports time to first token, per-stream and aggregate tokens/s,
completed vs requested tokens and errors by status. It never imports llama_cpp or the server:
a peer is measured exactly as llmserve is.

Tokens are counted from the ``stream_options.include_usage`` chunk where the server sends one,
else one per non-empty content chunk. ``ignore_eos`` goes out as an extra body key (llmserve and
llama-server honour it; servers that do not know it ignore it, and "completed vs requested"
shows whether every request ran to ``max_tokens``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import httpx
from rich.table import Table

from llmserve.errors import BenchError

Endpoint = Literal["chat", "completions"]

# Continuation-friendly prompts (sequences and lists): a model at temperature 0 rarely ends them
# early, so servers without ignore_eos still tend to generate the full max_tokens.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Count upwards, separating the numbers with commas: 1, 2, 3, 4, 5,",
    "The even numbers in order: 2, 4, 6, 8, 10, 12,",
    "Count down from one thousand: 1000, 999, 998, 997,",
    "The multiples of seven: 7, 14, 21, 28, 35,",
    "Write the numbers from 100 onwards in words: one hundred, one hundred and one,",
    "List of the days of the week, repeated forever: Monday, Tuesday, Wednesday,",
    "The odd numbers in order: 1, 3, 5, 7, 9, 11,",
    "Powers of two: 1, 2, 4, 8, 16, 32,",
    "The alphabet, again and again: a, b, c, d, e, f,",
    "Count by fives: 5, 10, 15, 20, 25,",
    "The squares: 1, 4, 9, 16, 25, 36,",
    "Months of the year, repeated: January, February, March,",
    "Count upwards from 500: 500, 501, 502, 503,",
    "The multiples of eleven: 11, 22, 33, 44,",
    "Count by tens: 10, 20, 30, 40, 50,",
    "Numbers from 2000 onwards: 2000, 2001, 2002, 2003,",
)


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per non-empty line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"cannot read the prompt file {path}: {exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise BenchError(f"the prompt file {path} holds no prompts (one per line)")
    return prompts


def api_root(url: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/v1`` all name the same server."""
    root = url.strip().rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    if not root.startswith(("http://", "https://")):
        raise BenchError(f"--url must start with http:// or https://, got {url!r}")
    return root


@dataclass(frozen=True)
class Workload:
    url: str
    prompts: Sequence[str] = DEFAULT_PROMPTS
    clients: int = 4
    # total requests; None = one per client
    requests: int | None = None
    max_tokens: int = 128
    endpoint: Endpoint = "chat"
    # None = the first id the server lists in /v1/models
    model: str | None = None
    seed: int = 42
    ignore_eos: bool = True
    # merged into every request body (e.g. a peer's own way to ban EOS)
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = 600.0
    # one short request before the clock starts (model warm-up), not counted
    warmup: bool = True

    @property
    def total_requests(self) -> int:
        return self.requests if self.requests is not None else self.clients

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def body(
        self, prompt: str, *, model: str | None, max_tokens: int | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "max_tokens": self.max_tokens if max_tokens is None else max_tokens,
            "temperature": 0.0,
            # the same greedy sampling everywhere: llama-cpp-python's server would otherwise
            # apply its default repeat penalty of 1.1 (and end these prompts early)
            "repeat_penalty": 1.0,
            "seed": self.seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if model is not None:
            body["model"] = model
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body


@dataclass
class RequestResult:
    index: int
    requested: int
    started: float
    finished: float = 0.0
    # HTTP status; None when no response came (connection refused, timeout)
    status: int | None = None
    # None = success; else the key it is counted under in "errors by status"
    error: str | None = None
    tokens: int = 0
    # from the usage chunk, where the server sends one
    prompt_tokens: int | None = None
    counted_from: Literal["usage", "chunks"] = "chunks"
    first_token: float | None = None
    last_token: float | None = None
    text: str = ""

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def stream_tokens_per_s(self) -> float | None:
        """Decode rate after the first token: (tokens - 1) / (last token - first token)."""
        if self.first_token is None or self.last_token is None or self.tokens < 2:
            return None
        span = self.last_token - self.first_token
        return (self.tokens - 1) / span if span > 0 else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Report:
    url: str
    endpoint: Endpoint
    model: str | None
    clients: int
    max_tokens: int
    wall_s: float
    results: list[RequestResult]

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.error is None]

    @property
    def errors(self) -> dict[str, int]:
        return dict(sorted(Counter(r.error for r in self.results if r.error).items()))

    @property
    def completed_tokens(self) -> int:
        return sum(r.tokens for r in self.ok)

    @property
    def requested_tokens(self) -> int:
        return sum(r.requested for r in self.results)

    @property
    def full_requests(self) -> int:
        """Successful requests that generated every requested token."""
        return sum(1 for r in self.ok if r.tokens >= r.requested)

    @property
    def aggregate_tokens_per_s(self) -> float:
        return self.completed_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def ttft(self, q: float) -> float | None:
        return percentile([r.ttft for r in self.ok if r.ttft is not None], q)

    def stream_rate(self, q: float) -> float | None:
        rates = [r.stream_tokens_per_s for r in self.ok]
        return percentile([x for x in rates if x is not None], q)

    def to_dict(self) -> dict[str, Any]:
        sources = sorted({r.counted_from for r in self.ok})
        return {
            "url": self.url,
            "endpoint": self.endpoint,
            "model": self.model,
            "clients": self.clients,
            "requests": len(self.results),
            "max_tokens": self.max_tokens,
            "ok": len(self.ok),
            "errors": self.errors,
            "full_requests": self.full_requests,
            "completed_tokens": self.completed_tokens,
            "requested_tokens": self.requested_tokens,
            "tokens_counted_from": "+".join(sources) if sources else None,
            "wall_s": self.wall_s,
            "aggregate_tokens_per_s": self.aggregate_tokens_per_s,
            "ttft_s": {"p50": self.ttft(50), "p95": self.ttft(95)},
            "stream_tokens_per_s": {
                "p50": self.stream_rate(50),
                "p5": self.stream_rate(5),
                "min": self.stream_rate(0),
            },
        }


# -- one streaming request ------------------------------------------------------------------


async def stream_request(
    client: httpx.AsyncClient, url: str, body: Mapping[str, Any], *, index: int = 0,
    first_token: asyncio.Event | None = None,
) -> RequestResult:
    """POST one streaming completion and time it. Never raises for server or network failures:
    they come back as ``error`` (the HTTP status, "stream_error", "truncated", "timeout",
    "connection"). ``first_token`` is set when the first content arrives."""
    result = RequestResult(index=index, requested=int(body["max_tokens"]),
                           started=time.perf_counter())
    chunks = 0
    usage_tokens: int | None = None
    done = False
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                result.error = str(response.status_code)
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, "event:" lines
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    result.error = "stream_error"
                    return result
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    result.error = "stream_error"
                    return result
                usage = event.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    usage_tokens = usage["completion_tokens"]
                    if isinstance(usage.get("prompt_tokens"), int):
                        result.prompt_tokens = usage["prompt_tokens"]
                text = _chunk_text(event)
                if text:
                    chunks += 1
                    parts.append(text)
                    if result.first_token is None:
                        result.first_token = now
                        if first_token is not None:
                            first_token.set()
                    result.last_token = now
            if not done:
                result.error = "truncated"
    except httpx.TimeoutException:
        result.error = "timeout"
    except httpx.HTTPError:
        result.error = "connection"
    finally:
        result.finished = time.perf_counter()
        result.text = "".join(parts)
        if usage_tokens is not None:
            result.tokens, result.counted_from = usage_tokens, "usage"
        else:
            result.tokens, result.counted_from = chunks, "chunks"
    return result


def _chunk_text(event: Mapping[str, Any]) -> str:
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


# -- a workload ------------------------------------------------------------------------------


def new_client(workload: Workload) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(workload.timeout, connect=10.0),
        limits=httpx.Limits(max_connections=workload.clients + 1,
                            max_keepalive_connections=workload.clients + 1),
    )


async def first_model_id(client: httpx.AsyncClient, root: str) -> str | None:
    """The first id in GET /v1/models, or None when the server does not list models."""
    try:
        response = await client.get(root + "/v1/models")
        data = response.json().get("data") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        model_id = data[0].get("id")
        return model_id if isinstance(model_id, str) else None
    return None


async def run_workload_async(workload: Workload) -> Report:
    root = api_root(workload.url)
    url = root + workload.path
    async with new_client(workload) as client:
        model = workload.model or await first_model_id(client, root)
        if workload.warmup:
            warm = await stream_request(
                client, url, workload.body("Hello", model=model, max_tokens=4)
            )
            if warm.error == "connection":
                raise BenchError(f"cannot connect to {root}")
        indices = iter(range(workload.total_requests))
        results: list[RequestResult] = []

        async def client_loop() -> None:
            for i in indices:  # a shared iterator: each index goes to exactly one client
                prompt = workload.prompts[i % len(workload.prompts)]
                body = workload.body(prompt, model=model)
                results.append(await stream_request(client, url, body, index=i))

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(workload.clients)))
        wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return Report(url=root, endpoint=workload.endpoint, model=model, clients=workload.clients,
                  max_tokens=workload.max_tokens, wall_s=wall, results=results)


def run_workload(workload: Workload) -> Report:
    return asyncio.run(run_workload_async(workload))


# -- servers the bench starts itself ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llmserve_command(
    model: Path | str, port: int, *, parallel: int = 1, threads: int | None = None,
    ctx_size: int = 4096, max_queue: int = 64, extra: Sequence[str] = (),
) -> list[str]:
    argv = [sys.executable, "-m", "llmserve", "run", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--parallel", str(parallel), "--ctx-size", str(ctx_size),
            "--max-queue", str(max_queue), "--log-level", "warning"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return [*argv, *extra]


class ServerProcess:
    """A server subprocess on 127.0.0.1 that is ready (GET /health 200, or GET /v1/models 200
    for servers without /health) when the constructor returns. Output goes to ``log`` (a file
    path) or is discarded. Use as a context manager, or call ``stop``."""

    def __init__(self, argv: Sequence[str], port: int, *, log: Path | None = None,
                 ready_timeout: float = 180.0, env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file: IO[bytes] | None = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = log.open("wb")
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL,
                stdout=self._log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        except OSError as exc:
            self._close_log()
            raise BenchError(f"cannot start {self.argv[0]}: {exc}") from None
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"the server exited with code {self.proc.returncode} before it was "
                        f"ready{self._log_hint()}"
                    )
                if self._ready(client):
                    return
                time.sleep(0.2)
        raise BenchError(f"the server was not ready within {timeout:.0f} s{self._log_hint()}")

    def _ready(self, client: httpx.Client) -> bool:
        try:
            health = client.get(self.url + "/health")
            if health.status_code == 404:
                return client.get(self.url + "/v1/models").status_code == 200
            return health.status_code == 200
        except httpx.HTTPError:
            return False

    def _log_hint(self) -> str:
        return f" (its output: {self.log})" if self.log else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def llmserve_server(model: Path, **options: Any) -> Iterator[ServerProcess]:
    """``python -m llmserve run MODEL`` on a free port for the duration of the block."""
    port = free_port()
    with ServerProcess(llmserve_command(model, port, **options), port,
                       env=same_llmserve_env()) as server:
        yield server


def same_llmserve_env() -> dict[str, str]:
    """PYTHONPATH for a child ``python -m llmserve`` that imports this very llmserve (a
    checkout, not whatever an editable install points at)."""
    here = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": here + (os.pathsep + rest if rest else "")}


# -- output ----------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}{unit}"


def report_rows(report: Report) -> list[tuple[str, str]]:
    errors = ", ".join(f"{k}: {v}" for k, v in report.errors.items()) or "none"
    sources = {r.counted_from for r in report.ok}
    return [
        ("server", report.url),
        ("model", report.model or "—"),
        ("endpoint", report.endpoint),
        ("clients × requests", f"{report.clients} × {len(report.results)}"),
        ("ok / errors", f"{len(report.ok)} / {len(report.results) - len(report.ok)} ({errors})"),
        ("completed / requested tokens",
         f"{report.completed_tokens} / {report.requested_tokens} "
         f"({report.full_requests} requests in full; counted from "
         f"{'+'.join(sorted(sources)) or '—'})"),
        ("TTFT p50 / p95", f"{_fmt(report.ttft(50), ' ms', 1000)} / "
                           f"{_fmt(report.ttft(95), ' ms', 1000)}"),
        ("per-stream tokens/s p50 / min", f"{_fmt(report.stream_rate(50))} / "
                                          f"{_fmt(report.stream_rate(0))}"),
        ("aggregate tokens/s", _fmt(report.aggregate_tokens_per_s)),
        ("wall time", _fmt(report.wall_s, " s", digits=2)),
    ]


def report_table(report: Report, title: str = "llmserve bench") -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in report_rows(report):
        table.add_row(name, value)
    return table
