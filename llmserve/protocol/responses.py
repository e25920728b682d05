"""OpenAI Responses API wire models (POST /v1/responses). Renames into params' vocabulary, and
the Responses shapes of ``tools`` and ``tool_choice`` into chat's (server/chat_plan.py checks
them, as it does for chat completions).

Input items are a discriminated union on ``type``: messages, function calls and their outputs,
and reasoning items (a client that manages the conversation itself sends an answer's output
items back).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from llmserve.errors import InvalidRequest
from llmserve.params import Family, Wire
from llmserve.protocol.sampling import LlamaCppSampling


class TextContent(BaseModel):
    """``input_text`` (what a user or system sends) or ``output_text`` (an earlier answer)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text"]
    text: str


class OtherContent(BaseModel):
    """Images, files and audio: accepted in the schema, refused by the route (text-only)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["input_image", "input_file", "input_audio", "refusal"]


Content = Annotated[TextContent | OtherContent, Field(discriminator="type")]


def _text(content: str | list[Content]) -> str:
    """Text content as one string; raises ValueError for a part that is not text."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        if not isinstance(part, TextContent):
            raise ValueError(f"content parts of type {part.type!r} are not supported: this "
                             "server runs text-only models")
        parts.append(part.text)
    return "".join(parts)


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Content]

    def text(self) -> str:
        return _text(self.content)


class FunctionCallItem(BaseModel):
    """A call an earlier answer made (``call_id`` is what its output answers)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """What the client's function returned for the call ``call_id``."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str | list[Content]

    def text(self) -> str:
        return _text(self.output)


class ReasoningItem(BaseModel):
    """An earlier answer's reasoning, sent back: kept with the input, not put in the prompt
    (chat templates drop earlier turns' reasoning too)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["reasoning"]
    id: str | None = None


def _item_type(value: Any) -> str:
    """An item's ``type`` as its union tag; a bare ``{"role", "content"}`` (EasyInputMessage) is
    a message. The tags are bracketed so that an error's ``param`` leaves them out
    (``input[0].arguments``, see server/requests.py ``_loc``)."""
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(
        value, "type", "message")
    return f"[{kind}]"


InputItem = Annotated[
    Annotated[MessageItem, Tag("[message]")]
    | Annotated[FunctionCallItem, Tag("[function_call]")]
    | Annotated[FunctionCallOutputItem, Tag("[function_call_output]")]
    | Annotated[ReasoningItem, Tag("[reasoning]")],
    Discriminator(_item_type),
]


class TextFormat(BaseModel):
    """``text.format``: the flat form of the Responses API (name, schema, strict side by
    side), unlike chat's ``response_format.json_schema``."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    strict: bool | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: TextFormat | None = None


# Fields of the Responses API that llmserve does not implement yet (refused unless "off").
RESPONSES_UNSUPPORTED = ("top_logprobs", "reasoning")
_TOOL_CHOICE_SHAPES = 'none, auto, required or {"type": "function", "name": ...}'


class ResponsesRequest(LlamaCppSampling):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    FAMILY: ClassVar[Family] = "responses"
    RENAMES: ClassVar[Mapping[str, str]] = {"max_output_tokens": "n_predict"}
    UNSUPPORTED = RESPONSES_UNSUPPORTED

    # the list first: a bad item's error is the one reported, not "not a string"
    input: list[InputItem] | str
    instructions: str | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    stream: bool = False
    background: bool = False
    text: TextOptions | None = None
    user: str | None = None
    # checked by server/chat_plan.py, after chat_tools/chat_tool_choice
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    top_logprobs: Any = None
    reasoning: Any = None

    def wire(self) -> Wire:
        wire = super().wire()
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type == "text":
            return wire
        schema = fmt.schema_ if fmt.schema_ is not None else {}
        values = {**wire.values, "json_schema": schema}
        names = {**wire.names, "json_schema": "text.format"}
        return dataclasses.replace(wire, values=values, names=names)

    def text_format(self) -> dict[str, Any]:
        """``text.format`` as the response object echoes it."""
        fmt = self.text.format if self.text else None
        if fmt is None:
            return {"type": "text"}
        return fmt.model_dump(mode="json", by_alias=True, exclude_none=True)

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """``tools`` in chat's shape (``{"type": "function", "function": {...}}``; the Responses
        API has the function's fields flat). Other tool types (web_search, file_search, mcp,
        ...) are refused naming their type."""
        if self.tools is None:
            return None
        if not isinstance(self.tools, list):
            raise InvalidRequest("invalid 'tools': must be a list of tools", param="tools")
        out: list[dict[str, Any]] = []
        for i, tool in enumerate(self.tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or kind != "function":
                raise InvalidRequest(
                    f"invalid 'tools[{i}]': tools of type {kind!r} are not supported; this "
                    'server runs function tools ({"type": "function", "name": ..., '
                    '"parameters": {...}})', param=f"tools[{i}]")
            out.append({"type": "function", "function": {
                k: v for k, v in tool.items() if k in ("name", "description", "parameters",
                                                         "strict")}})
        return out

    def chat_tool_choice(self) -> Any:
        """``tool_choice`` in chat's shape (a named function: ``{"type": "function",
        "function": {"name": ...}}``)."""
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto", "required"):
            return choice
        if isinstance(choice, dict) and choice.get("type") == "function":
            name = choice.get("name")
            if isinstance(name, str):
                return {"type": "function", "function": {"name": name}}
        kind = choice.get("type") if isinstance(choice, dict) else None
        what = f"tool choices of type {kind!r} are not supported" if kind is not None \
            else "not a tool choice"
        raise InvalidRequest(f"invalid 'tool_choice': {what}; use {_TOOL_CHOICE_SHAPES}",
                             param="tool_choice")
