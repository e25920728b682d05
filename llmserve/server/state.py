"""What every route needs, stored once on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from llmserve.audio.host import SpeechHost
from llmserve.registry import ModelHost
from llmserve.server.generation import Limits, RunningGenerations
from llmserve.server.options import ServerOptions

if TYPE_CHECKING:
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

    @staticmethod
    def of(request: Request) -> AppState:
        state: AppState = request.app.state.llmserve
        return state
