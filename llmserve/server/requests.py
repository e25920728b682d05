"""Reading request bodies: bad JSON, non-objects and schema violations all become 400s.

Every route that takes a JSON body reads it here, so two kinds of hostile JSON are refused once
for all of them, before anything else sees the data:

- nesting deeper than ``MAX_JSON_DEPTH`` levels (no request needs more; ``json.loads`` itself
  fails at about 1,000 with a RecursionError, and deep values break whatever walks them later);
- a JSON-escaped lone UTF-16 surrogate (``"\\ud800"``) anywhere, key or value: Python keeps it
  in the string, and the first UTF-8 encode (tokenising, or writing the answer) fails. Raw
  bytes cannot carry one: they must be valid UTF-8 to parse at all.

Both checks start with a scan of the raw bytes in C and walk the parsed body only when that
scan finds something: more brackets than the limit, or an escape that may be a lone surrogate.
Cost, measured with timeit on 18-20 KB chat bodies (41 messages; json.loads alone 40-80 µs,
as the shared 2-core VM's load varies): +30 µs when only the scans run; +40-85 µs when the text
holds 516 brackets, so the depth walk runs; +100-145 µs when ~340 emoji also arrive escaped
(surrogate pairs, Python's default), which the lone-surrogate scan must look at.
"""

from __future__ import annotations

import json
import re
from typing import TypeAlias, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from llmserve.errors import InvalidRequest, UnsupportedMediaType

M = TypeVar("M", bound=BaseModel)

# Clients are sloppy about Content-Type (curl -d sends form-urlencoded), so only types that
# cannot carry a JSON body are refused.
_REFUSED_TYPES = ("multipart/", "image/", "audio/", "video/")

# The top-level object is level 1: {"messages": [{"content": [{"type": ...}]}]} is 4 deep.
MAX_JSON_DEPTH = 64

# An escaped high surrogate without a low one after it, or a low one without a high one before
# it. An escaped backslash before "u" can match too; the exact check on the parsed body decides.
_LONE_SURROGATE_ESCAPE = re.compile(
    rb"\\u[dD](?:[89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    rb"|[c-fC-F](?<!\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F]))"
)
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_json_object(request: Request) -> dict[str, object]:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"the request body must be a JSON object, not {type(data).__name__}"
        )
    return data


async def read_json(request: Request) -> dict[str, object] | list[object]:
    """A JSON object or array (llama-server's POST /lora-adapters takes an array)."""
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
    except RecursionError:
        raise _too_deep() from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict | list):
        raise InvalidRequest(
            f"the request body must be a JSON object, not {type(data).__name__}"
        )
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH:
        _check_depth(data)
    if _LONE_SURROGATE_ESCAPE.search(raw):
        _check_surrogates(data)
    return data


def _too_deep() -> InvalidRequest:
    return InvalidRequest(
        f"the request body nests objects and arrays more than {MAX_JSON_DEPTH} levels deep, "
        "the server's limit"
    )


def _check_depth(data: dict[str, object] | list[object]) -> None:
    """Level by level, without recursion (a deep body must not recurse)."""
    level: list[dict[str, object] | list[object]] = [data]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            item
            for container in level
            for item in (container.values() if isinstance(container, dict) else container)
            if isinstance(item, dict | list)
        ]
        if not level:
            return
    raise _too_deep()


def _check_surrogates(data: dict[str, object] | list[object]) -> None:
    """Every key and string, depth first; paths are (parent, key) links, spelled out only for
    the error. Runs after ``_check_depth``, so the stack stays small."""
    stack: list[tuple[dict[str, object] | list[object], _Path]] = [(data, None)]
    while stack:
        value, path = stack.pop()
        pairs = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in pairs:
            if isinstance(key, str) and _SURROGATE.search(key):
                raise _lone_surrogate((path, key), "the key ")
            if isinstance(item, dict | list):
                stack.append((item, (path, key)))
            elif isinstance(item, str) and _SURROGATE.search(item):
                raise _lone_surrogate((path, key), "")


_Path: TypeAlias = "tuple[_Path, str | int] | None"


def _spell(path: _Path) -> str:
    """``messages[0].content``, the form ``param`` takes everywhere (see ``_loc``)."""
    parts: list[str | int] = []
    while path is not None:
        path, key = path
        parts.append(key)
    out = ""
    for part in reversed(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # an error message is UTF-8 encoded: a surrogate in a key must not reach it
            key = part.encode("utf-8", "backslashreplace").decode("utf-8")
            out += f".{key}" if out else key
    return out


def _lone_surrogate(at: _Path, what: str) -> InvalidRequest:
    path = _spell(at)
    return InvalidRequest(
        f"invalid '{path}': {what}contains a lone UTF-16 surrogate escape (\\ud800-\\udfff "
        "without its pair), which is not a Unicode character",
        param=path,
    )


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
