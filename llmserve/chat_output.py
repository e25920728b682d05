"""A chat answer as it grows: reasoning split off first (``reasoning``), then tool calls found
in the rest (``tool_calls``). ``feed`` gives the stream's deltas, ``answer`` the non-streamed
message; both come from the same parse of the same text, so they agree. Pure code."""

from __future__ import annotations

from dataclasses import dataclass

from llmserve.reasoning import ReasoningSplitter
from llmserve.tool_calls import Content, Delta, ToolParser, ToolStream

_WS = " \t\r\n"


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class FunctionCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Answer:
    content: str | None
    reasoning: str | None
    calls: tuple[FunctionCall, ...]


class ChatOutput:
    def __init__(self, splitter: ReasoningSplitter, parser: ToolParser | None) -> None:
        self._splitter = splitter
        self._tools = ToolStream(parser) if parser is not None else None
        self._text = ""
        self._reasoning = 0
        self._content = 0
        self._answer: Answer | None = None

    @property
    def active(self) -> bool:
        """False: the answer is plain text, passed through as the engine gives it."""
        return self._splitter.enabled or self._tools is not None

    def feed(self, piece: str) -> list[Delta | Reasoning]:
        self._text += piece
        return self._update(final=False)

    def finish(self) -> list[Delta | Reasoning]:
        """The last deltas; afterwards ``answer`` is ready."""
        return self._update(final=True)

    def answer(self) -> Answer:
        assert self._answer is not None, "finish() first"
        return self._answer

    def _update(self, *, final: bool) -> list[Delta | Reasoning]:
        split = self._splitter.split(self._text, final=final)
        out: list[Delta | Reasoning] = []
        if len(split.reasoning) > self._reasoning:
            out.append(Reasoning(split.reasoning[self._reasoning:]))
            self._reasoning = len(split.reasoning)
        if self._tools is not None:
            out += self._tools.update(split.content, final=final)
            if final:
                parsed = self._tools.parser.parse(split.content, final=True)
                content = parsed.content
                calls = tuple(FunctionCall(i, c.name, c.arguments)
                              for i, c in zip(self._tools.ids, parsed.calls, strict=True))
        else:
            content = split.content.lstrip(_WS) if self._splitter.enabled else split.content
            if not final:
                content = content.rstrip(_WS)
            if len(content) > self._content:
                out.append(Content(content[self._content:]))
                self._content = len(content)
            calls = ()
        if final:
            self._answer = Answer(content or None, split.reasoning or None, calls)
        return out
