"""What every route needs, stored once on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from llmserve.registry import ModelHost
from llmserve.server.generation import Limits, RunningGenerations


@dataclass
class AppState:
    host: ModelHost
    limits: Limits
    running: RunningGenerations = field(default_factory=RunningGenerations)

    @staticmethod
    def of(request: Request) -> AppState:
        state: AppState = request.app.state.llmserve
        return state
