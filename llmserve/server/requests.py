"""Reading request bodies: bad JSON, non-objects and schema violations all become 400s."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from llmserve.errors import InvalidRequest, UnsupportedMediaType

M = TypeVar("M", bound=BaseModel)

# Clients are sloppy about Content-Type (curl -d sends form-urlencoded), so only types that
# cannot carry a JSON body are refused.
_REFUSED_TYPES = ("multipart/", "image/", "audio/", "video/")


async def read_json_object(request: Request) -> dict[str, object]:
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith(_REFUSED_TYPES):
        raise UnsupportedMediaType(
            f"expected a JSON body (Content-Type: application/json), got {content_type!r}"
        )
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"the request body must be a JSON object, not {type(data).__name__}"
        )
    return data


def validate(model: type[M], data: dict[str, object]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_from(exc) from None


def invalid_from(exc: ValidationError) -> InvalidRequest:
    first = exc.errors(include_url=False)[0]
    param = _loc(first["loc"])
    message = first["msg"]
    if first["type"] == "missing":
        message = "this field is required"
    return InvalidRequest(f"invalid '{param}': {message}" if param else message, param=param)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[...]", "function-after[_content_required(), ChatMessage]"):
            continue  # pydantic's union-branch and validator markers, not field names
        elif "[" in part or "(" in part:
            continue
        else:
            out += f".{part}" if out else part
    return out


async def parse(request: Request, model: type[M]) -> M:
    return validate(model, await read_json_object(request))
