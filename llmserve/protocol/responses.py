"""OpenAI Responses API wire models (POST /v1/responses). Renames into params' vocabulary only.

Input items are a discriminated union on ``type`` so that other item kinds (``function_call``,
``function_call_output``, once function tools land) are one more class here and one more case
in the route's conversation builder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

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


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Content]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts: list[str] = []
        for part in self.content:
            if not isinstance(part, TextContent):
                raise ValueError(f"content parts of type {part.type!r} are not supported: this "
                                 "server runs text-only models")
            parts.append(part.text)
        return "".join(parts)


class ToolItem(BaseModel):
    """Tool calls and their outputs: refused until function tools are implemented."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function_call", "function_call_output", "reasoning"]


def _item_type(value: Any) -> str:
    """An item's ``type``; a bare ``{"role", "content"}`` (EasyInputMessage) is a message."""
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(
        value, "type", "message")
    return "message" if kind == "message" else "tool"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[ToolItem, Tag("tool")],
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
RESPONSES_UNSUPPORTED = ("tools", "tool_choice", "parallel_tool_calls", "top_logprobs",
                         "reasoning")


class ResponsesRequest(LlamaCppSampling):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    FAMILY: ClassVar[Family] = "responses"
    RENAMES: ClassVar[Mapping[str, str]] = {"max_output_tokens": "n_predict"}
    UNSUPPORTED = RESPONSES_UNSUPPORTED

    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    stream: bool = False
    background: bool = False
    text: TextOptions | None = None
    user: str | None = None
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
