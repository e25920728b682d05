"""create_app: the Starlette application factory (tests build their own apps with it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from llmserve.audio.host import SpeechHost
from llmserve.defaults import DEFAULT_MAX_QUEUE
from llmserve.errors import LlmserveError
from llmserve.registry import ModelHost
from llmserve.server import metrics
from llmserve.server.batches import BatchRunner
from llmserve.server.errors import handle_http_exception, handle_llmserve_error, handle_unexpected
from llmserve.server.generation import Limits
from llmserve.server.middleware import Guard, RequestTracking
from llmserve.server.options import ServerOptions
from llmserve.server.routes import (
    audio,
    batches,
    embeddings,
    files,
    health,
    kobold,
    llamacpp,
    lmstudio,
    lora,
    models,
    native,
    ollama,
    openai,
    responses,
    system,
    webui,
)
from llmserve.server.shutdown import Drain
from llmserve.server.state import AppState
from llmserve.store import Store

# what a browser page may read from our responses besides the CORS-safelisted headers
_EXPOSED_HEADERS = ["X-Request-ID", "Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                    "X-RateLimit-Reset"]


def create_app(
    host: ModelHost, *, limits: Limits | None = None, options: ServerOptions | None = None,
    speech: SpeechHost | None = None, store: Store | None = None,
) -> Starlette:
    """``speech``: the Whisper models; by default the test model when it is installed.
    ``store``: the data dir (responses, files, batches); None runs stateless (--no-store).
    The app closes it on shutdown."""
    options = options or ServerOptions()
    speech = speech or SpeechHost([], max_queue=DEFAULT_MAX_QUEUE)
    state = AppState(host=host, limits=limits or Limits(), options=options,
                     metrics=metrics.Metrics(host, replica=options.instance_name),
                     drain=Drain(), speech=speech, store=store)
    routes = [*health.routes, *models.routes, *openai.routes, *responses.routes, *files.routes,
              *batches.routes, *llamacpp.routes, *kobold.routes, *native.routes,
              *system.routes, *metrics.routes, *ollama.routes, *lmstudio.routes, *lora.routes,
              *audio.routes, *embeddings.routes]
    if options.webui:
        routes += webui.routes

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        host.start()
        if store is not None:
            responses.fail_unfinished(store)
        if state.batches is not None:
            state.batches.start()
        yield
        # background work first: what it has in flight is dropped before the engine goes
        for task in list(state.background.values()):
            task.cancel()
        await asyncio.gather(*state.background.values(), return_exceptions=True)
        if state.batches is not None:
            await state.batches.stop()
        await host.close()
        await anyio.to_thread.run_sync(speech.close)
        if store is not None:
            store.close()

    middleware = [Middleware(RequestTracking, state=state, routes=routes)]
    if options.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["*"],
            allow_headers=["*"], expose_headers=_EXPOSED_HEADERS,
        ))
    middleware.append(Middleware(Guard, state=state, routes=routes))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            LlmserveError: handle_llmserve_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.llmserve = state
    if store is not None:
        state.batches = BatchRunner(app, app.router, store, host)
    return app
