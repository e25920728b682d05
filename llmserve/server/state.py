"""What every route needs, stored once on ``app.state``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from llmserve.audio.host import SpeechHost
from llmserve.registry import ModelHost
from llmserve.server.generation import Limits, RunningGenerations
from llmserve.server.options import ServerOptions
from llmserve.store import Store

if TYPE_CHECKING:
    from llmserve.server.batches import BatchRunner
    from llmserve.server.metrics import Metrics
    from llmserve.server.shutdown import Drain


@dataclass
class AppState:
    host: ModelHost
    limits: Limits
    options: ServerOptions
    metrics: Metrics
    drain: Drain
    speech: SpeechHost
    running: RunningGenerations = field(default_factory=RunningGenerations)
    # the data dir; None with --no-store
    store: Store | None = None
    # background responses still running, by id
    background: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    batches: BatchRunner | None = None

    @staticmethod
    def of(request: Request) -> AppState:
        state: AppState = request.app.state.llmserve
        return state
