"""Reasoning text (``<think>…</think>``) split from the answer, as llama-server and DeepSeek's API
return it in ``reasoning_content``.

``reasoning_format`` (request field, ``--reasoning-format`` for the server's default):

- ``none``: nothing is split; the think block stays in ``content``.
- ``auto`` (default): split when the model thinks: the rendered prompt ends inside an open
  ``<think>`` (DeepSeek-R1 distills, Qwen3 with thinking forced), or the template knows
  ``<think>`` and the answer starts with one (Qwen3, QwQ).
- ``deepseek``: as auto, and an answer starting with ``<think>`` is split whatever the template.

Like the tool parser, ``split`` only grows as the text grows (held back: a possible partial
``</think>``, trailing blanks), so a stream's pieces reassemble into the non-streamed answer.
Tool calls are looked for in the answer part only. Pure code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmserve.tool_calls import partial_marker

ReasoningFormat = Literal["none", "auto", "deepseek"]
REASONING_FORMATS: tuple[ReasoningFormat, ...] = ("none", "auto", "deepseek")

OPEN, CLOSE = "<think>", "</think>"
_WS = " \t\r\n"


@dataclass(frozen=True)
class Split:
    reasoning: str
    # the answer after the think block ("" while the block is still open)
    content: str
    # False while the text may still turn out to be (or still is) reasoning
    content_started: bool


@dataclass(frozen=True)
class ReasoningSplitter:
    """``enabled``: split at all; ``starts_open``: the prompt already opened the block."""

    enabled: bool
    starts_open: bool = False

    @staticmethod
    def plan(fmt: ReasoningFormat, template: str, prompt: str) -> ReasoningSplitter:
        if fmt == "none":
            return ReasoningSplitter(False)
        starts_open = prompt.rstrip(_WS).endswith(OPEN)
        knows = OPEN in template or starts_open
        return ReasoningSplitter(fmt == "deepseek" or knows, starts_open)

    def split(self, text: str, *, final: bool) -> Split:
        if not self.enabled:
            return Split("", text, True)
        body = text
        if not self.starts_open:
            lead = text.lstrip(_WS)
            if not final and lead and OPEN.startswith(lead) and lead != OPEN:
                return Split("", "", False)  # could still become "<think>"
            if not lead.startswith(OPEN):
                return Split("", text, True)
            body = lead[len(OPEN):]
        end = body.find(CLOSE)
        if end < 0:
            if final:
                return Split(body.strip(_WS), "", True)
            held = partial_marker(body, CLOSE)
            return Split(body[: len(body) - held].strip(_WS), "", False)
        return Split(body[:end].strip(_WS), body[end + len(CLOSE):], True)

