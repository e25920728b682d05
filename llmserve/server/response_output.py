"""A response's ``output`` items, built from a chat answer's pieces (llmserve.chat_output): a
``reasoning`` item for split-off reasoning, a ``message`` for text, a ``function_call`` per tool
call, in the order the pieces come; and the typed stream events that announce them, in
OpenAI's order (an item is ``added``, grows by deltas, and is ``done`` when the next one begins
or the answer ends).

The non-streamed ``output`` comes from the same builder fed the whole answer at once, so a
stream's items and a plain answer's agree. ``chat_messages`` turns items (input or output) back
into chat messages for the template: that is how a stored turn becomes the next turn's
conversation. Pure code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from llmserve.chat_output import Reasoning
from llmserve.ids import object_id
from llmserve.tool_calls import CallArguments, CallStart, Content, Delta

# One stream event: {"type": ..., fields}; the route numbers and sends it.
Event = dict[str, Any]
Status = Literal["in_progress", "completed", "incomplete"]


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning_text(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


@dataclass
class _Item:
    kind: Literal["message", "reasoning", "function_call"]
    id: str
    index: int
    # the message's text, the reasoning, or the call's arguments (JSON text)
    text: str = ""
    call_id: str = ""
    name: str = ""
    status: Status = "in_progress"

    def render(self) -> dict[str, Any]:
        done = self.status != "in_progress"
        if self.kind == "message":
            return {"id": self.id, "type": "message", "status": self.status,
                    "role": "assistant", "content": [output_text(self.text)] if done else []}
        if self.kind == "reasoning":
            return {"id": self.id, "type": "reasoning", "status": self.status, "summary": [],
                    "content": [_reasoning_text(self.text)] if done else []}
        return {"id": self.id, "type": "function_call", "status": self.status,
                "call_id": self.call_id, "name": self.name,
                "arguments": self.text if done else ""}

    def where(self) -> dict[str, Any]:
        if self.kind == "function_call":
            return {"item_id": self.id, "output_index": self.index}
        return {"item_id": self.id, "output_index": self.index, "content_index": 0}

    def opened(self) -> list[Event]:
        events = [{"type": "response.output_item.added", "output_index": self.index,
                   "item": self.render()}]
        if self.kind != "function_call":
            part = output_text("") if self.kind == "message" else _reasoning_text("")
            events.append({"type": "response.content_part.added", **self.where(), "part": part})
        return events

    def delta(self, fragment: str) -> Event:
        self.text += fragment
        kind = {"message": "response.output_text.delta",
                "reasoning": "response.reasoning_text.delta",
                "function_call": "response.function_call_arguments.delta"}[self.kind]
        extra: dict[str, Any] = {"logprobs": []} if self.kind == "message" else {}
        return {"type": kind, **self.where(), "delta": fragment, **extra}

    def closed(self, status: Status) -> list[Event]:
        self.status = status
        item = {"type": "response.output_item.done", "output_index": self.index,
                "item": self.render()}
        if self.kind == "function_call":
            return [{"type": "response.function_call_arguments.done", **self.where(),
                     "arguments": self.text}, item]
        if self.kind == "message":
            return [{"type": "response.output_text.done", **self.where(), "text": self.text,
                     "logprobs": []},
                    {"type": "response.content_part.done", **self.where(),
                     "part": output_text(self.text)}, item]
        return [{"type": "response.reasoning_text.done", **self.where(), "text": self.text},
                {"type": "response.content_part.done", **self.where(),
                 "part": _reasoning_text(self.text)}, item]


class ResponseOutput:
    """The output items of one answer as its pieces arrive. Not thread-safe (one per stream)."""

    def __init__(self) -> None:
        self._items: list[_Item] = []
        self._calls: dict[int, _Item] = {}

    def add(self, pieces: Iterable[Delta | Reasoning]) -> list[Event]:
        """The events for ``pieces``: a piece continues the open item when it is of its kind
        (the same call, for arguments), else that item is done and a new one is added."""
        events: list[Event] = []
        last = self._items[-1] if self._items else None
        if last is not None and last.kind == "function_call":
            # One update can end the open call and bring text after it, the text first
            # (ToolStream reports content before calls): the call's arguments go first.
            pieces = sorted(pieces, key=lambda p: not (
                isinstance(p, CallArguments) and self._calls.get(p.index) is last))
        for piece in pieces:
            if isinstance(piece, CallStart):
                item = self._open("function_call", "fc", events)
                item.call_id, item.name = piece.id, piece.name
                self._calls[piece.index] = item
                events += item.opened()
            elif isinstance(piece, CallArguments):
                # a parser reports a call's arguments only until the next call starts
                assert self._calls[piece.index] is self._items[-1]
                events.append(self._calls[piece.index].delta(piece.fragment))
            else:
                kind: Literal["message", "reasoning"] = (
                    "reasoning" if isinstance(piece, Reasoning) else "message")
                assert isinstance(piece, Reasoning | Content)
                item = self._current(kind, events)
                events.append(item.delta(piece.text))
        return events

    def finish(self, status: Literal["completed", "incomplete"]) -> list[Event]:
        """The last events: the open item ends with ``status`` (``incomplete``: the answer was
        cut short). An answer with nothing in it still gets its (empty) message."""
        events: list[Event] = []
        if not self._items:
            self._current("message", events)
        events += self._items[-1].closed(status)
        return events

    def items(self) -> list[dict[str, Any]]:
        return [item.render() for item in self._items]

    def _current(self, kind: Literal["message", "reasoning"], events: list[Event]) -> _Item:
        if self._items and self._items[-1].kind == kind:
            return self._items[-1]
        item = self._open(kind, "msg" if kind == "message" else "rs", events)
        events += item.opened()
        return item

    def _open(self, kind: Literal["message", "reasoning", "function_call"], prefix: str,
              events: list[Event]) -> _Item:
        if self._items:
            events += self._items[-1].closed("completed")
        item = _Item(kind, object_id(prefix), len(self._items))
        self._items.append(item)
        return item


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def chat_messages(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Stored items (an input's or an output's) as chat messages: a message as itself, function
    calls as the ``tool_calls`` of an assistant message (the one just before, or a new one),
    an output as a ``tool`` message; reasoning is left out."""
    out: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "message":
            out.append({"role": item["role"], "content": _content_text(item["content"])})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item["type"] == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _content_text(item["output"])})
    return out
