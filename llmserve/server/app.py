"""create_app: the Starlette application factory (tests build their own apps with it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from llmserve.errors import LlmserveError
from llmserve.registry import ModelHost
from llmserve.server.errors import handle_http_exception, handle_llmserve_error, handle_unexpected
from llmserve.server.generation import Limits
from llmserve.server.routes import health, kobold, llamacpp, models, native, openai
from llmserve.server.state import AppState


def create_app(host: ModelHost, *, limits: Limits | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await host.close()

    app = Starlette(
        routes=[*health.routes, *models.routes, *openai.routes, *llamacpp.routes, *kobold.routes,
                *native.routes],
        exception_handlers={
            LlmserveError: handle_llmserve_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.llmserve = AppState(host=host, limits=limits or Limits())
    return app
