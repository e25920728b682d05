"""Tool calling: the request's ``tools``/``tool_choice`` checked, the call format a chat template
speaks, the grammar that forces a call, and the parser that finds calls in the output (also
incrementally, for streams).

Formats (``FORMATS``), picked from the template's source by ``detect_format`` unless the server's
``--tool-parser`` names one:

- ``hermes`` (Hermes 2/3, Qwen 2.5, Qwen 3): ``<tool_call>\\n{"name": …, "arguments": {…}}\\n
  </tool_call>``, one block per call. Detected by ``<tool_call>`` in the template.
- ``llama3`` (Llama 3.1–3.3): a JSON object ``{"name": …, "parameters": {…}}`` as the whole
  answer, optionally after ``<|python_tag|>``; several separated by ``;``. Detected by
  ``<|python_tag|>`` or by a Llama 3 header template that mentions tools.
- ``mistral`` (Mistral, Ministral, Magistral): ``[TOOL_CALLS][{"name": …, "arguments": {…}}, …]``
  or the newer ``[TOOL_CALLS]name[ARGS]{…}``. Detected by ``[TOOL_CALLS]``.
- ``generic`` (any other template, llama-server's generic format): the tools are described in a
  system message (``GENERIC_PROMPT``) and a call is the JSON object
  ``{"tool_calls": [{"name": …, "arguments": {…}}, …]}``.

The parser is one function, ``parse(text, final=...)``, whose result only grows as the text
grows: content it reports is never taken back, a call is reported once its name is complete and
its ``arguments`` text (as the model wrote it, a JSON object) only gets longer. ``ToolStream``
turns successive parses into OpenAI stream deltas, so the streamed pieces always reassemble
into the non-streamed answer, which is the final parse of the same text.

Pure code: no llama_cpp, no server.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema
import jsonschema.exceptions

from llmserve.errors import InvalidRequest
from llmserve.ids import random_hex

Format = Literal["hermes", "llama3", "mistral", "generic"]
FORMATS: tuple[Format, ...] = ("hermes", "llama3", "mistral", "generic")

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# llama-server's generic tool prompt (common/chat.cpp), extended with the tool list and the
# call shape because a template without tool support cannot show them itself.
GENERIC_PROMPT = (
    "You can call the following tools. To call tools, answer with only a JSON object of the "
    'form {{"tool_calls": [{{"name": "<tool name>", "arguments": {{<arguments>}}}}]}}; '
    "otherwise answer the user normally.\n\nTools:\n{tools}"
)


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: Mapping[str, Any]
    strict: bool
    # the tool as the client sent it: what the chat template sees
    spec: Mapping[str, Any]


@dataclass(frozen=True)
class ToolChoice:
    """``mode``: none (no tools in the prompt), auto, required (some call), or function
    (``name`` must be called)."""

    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


def parse_tools(value: Any) -> tuple[Tool, ...]:
    """The request's ``tools``: function tools whose ``parameters`` is a valid JSON Schema.
    Raises InvalidRequest naming the bad entry."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest("invalid 'tools': must be a list of tools", param="tools")
    tools: list[Tool] = []
    for i, item in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(item, dict) or item.get("type") != "function":
            raise InvalidRequest(f"invalid '{where}': only function tools are supported "
                                 '({"type": "function", "function": {...}})', param=where)
        fn = item.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequest(f"invalid '{where}.function': must be an object",
                                 param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest(
                f"invalid '{where}.function.name': must be 1-64 letters, digits, _ or -",
                param=f"{where}.function.name")
        if any(t.name == name for t in tools):
            raise InvalidRequest(f"invalid '{where}.function.name': {name!r} is defined twice",
                                 param=f"{where}.function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        check_schema(params, f"{where}.function.parameters")
        strict = fn.get("strict", False)
        if not isinstance(strict, bool) and strict is not None:
            raise InvalidRequest(f"invalid '{where}.function.strict': must be true or false",
                                 param=f"{where}.function.strict")
        tools.append(Tool(name, params, bool(strict), item))
    return tuple(tools)


def check_schema(schema: Any, param: str) -> None:
    """A tool's ``parameters``: a JSON Schema (checked against its metaschema) for an object."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"invalid '{param}': must be a JSON Schema object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise InvalidRequest(f"invalid '{param}': not a valid JSON Schema: {exc.message}",
                             param=param) from None
    if schema.get("type", "object") != "object":
        raise InvalidRequest(f"invalid '{param}': the arguments must be an object "
                             '("type": "object")', param=param)


def parse_tool_choice(value: Any, tools: Sequence[Tool]) -> ToolChoice:
    """``tool_choice`` against ``tools``. Without tools only "none"/"auto" pass (they mean
    nothing there, and clients send them)."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise InvalidRequest("invalid 'tool_choice': must be none, auto, required or "
                                 '{"type": "function", "function": {"name": ...}}',
                                 param="tool_choice")
        if value == "required" and not tools:
            raise InvalidRequest("invalid 'tool_choice': 'required' needs 'tools'",
                                 param="tool_choice")
        return ToolChoice("none" if not tools else value)  # type: ignore[arg-type]
    fn = value.get("function") if isinstance(value, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name,
                                                                                       str):
        raise InvalidRequest('invalid \'tool_choice\': expected {"type": "function", '
                             '"function": {"name": ...}}', param="tool_choice")
    if not tools:
        raise InvalidRequest("invalid 'tool_choice': names a function but no 'tools' were "
                             "given", param="tool_choice")
    if name not in {t.name for t in tools}:
        raise InvalidRequest(f"invalid 'tool_choice': no tool named {name!r} in 'tools' "
                             f"(known: {', '.join(t.name for t in tools)})",
                             param="tool_choice")
    return ToolChoice("function", name)


def check_tool_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Every ``role: tool`` message answers a call an earlier assistant message made."""
    known: set[str] = set()
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls is not None:
            if not isinstance(calls, list):
                raise InvalidRequest(f"invalid 'messages[{i}].tool_calls': must be a list",
                                     param=f"messages[{i}].tool_calls")
            for j, call in enumerate(calls):
                if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
                    raise InvalidRequest(
                        f"invalid 'messages[{i}].tool_calls[{j}]': expected "
                        '{"id": ..., "type": "function", "function": {"name", "arguments"}}',
                        param=f"messages[{i}].tool_calls[{j}]")
                if isinstance(call.get("id"), str):
                    known.add(call["id"])
        if m.get("role") == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in known:
                raise InvalidRequest(
                    f"invalid 'messages[{i}].tool_call_id': {call_id!r} matches no tool call "
                    "of an earlier assistant message", param=f"messages[{i}].tool_call_id")


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: an assistant call's ``arguments`` as an object
    (templates write it with ``tojson``; OpenAI sends a JSON string), as transformers' docs and
    llama-server do."""
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls")
        if not isinstance(calls, list):
            out.append(dict(m))
            continue
        fixed = []
        for call in calls:
            fn = dict(call.get("function") or {})
            if isinstance(fn.get("arguments"), str):
                with contextlib.suppress(json.JSONDecodeError):  # else as sent
                    fn["arguments"] = json.loads(fn["arguments"])
            fixed.append({**call, "function": fn, **fn})
        out.append({**m, "tool_calls": fixed})
    return out


def detect_format(template: str) -> Format:
    """The call format a chat template's source speaks (see the module docstring)."""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template
                                        and re.search(r"\btools\b", template)):
        return "llama3"
    return "generic"


def generic_system_prompt(tools: Sequence[Tool]) -> str:
    listing = "\n".join(json.dumps(t.spec.get("function", {}), ensure_ascii=False,
                                   allow_nan=False)
                        for t in tools)
    return GENERIC_PROMPT.format(tools=listing)


def with_generic_prompt(messages: list[dict[str, Any]], tools: Sequence[Tool]
                        ) -> list[dict[str, Any]]:
    """The tool prompt prepended to the system message (or as a new first one)."""
    prompt = generic_system_prompt(tools)
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        text = first.get("content") or ""
        return [{**first, "content": f"{text}\n\n{prompt}" if text else prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


# -- grammar ---------------------------------------------------------------------------------

_ARGS_KEY: dict[Format, str] = {"hermes": "arguments", "llama3": "parameters",
                                "mistral": "arguments", "generic": "arguments"}


def call_schema(tools: Sequence[Tool], choice: ToolChoice, fmt: Format) -> dict[str, Any]:
    """The JSON Schema of one call object in ``fmt``: the name first, then the arguments
    (the converter keeps property order, so a stream shows the name early)."""
    chosen = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    key = _ARGS_KEY[fmt]
    alternatives = [
        {"type": "object",
         "properties": {"name": {"const": t.name}, key: dict(t.parameters)},
         "required": ["name", key], "additionalProperties": False}
        for t in chosen
    ]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


@dataclass(frozen=True)
class GrammarPlan:
    """What forces a call: GBNF whose rule ``tool-call`` is one call object (the caller fills
    it in from ``call_schema``); ``triggers``: the regexes that start it (a lazy grammar, for
    ``auto``); empty: it applies from the first token."""

    root: str
    triggers: tuple[str, ...] = ()


def grammar_plan(fmt: Format, choice: ToolChoice, parallel: bool) -> GrammarPlan | None:
    """None where nothing can be enforced: ``none``, and ``auto`` in the generic format (it has
    no marker to trigger on; its calls are parsed afterwards)."""
    if choice.mode == "none" or (choice.mode == "auto" and fmt == "generic"):
        return None
    more = "*" if parallel else "{0,0}"
    roots: dict[Format, str] = {
        "hermes": f'root ::= hermes-call ("\\n" hermes-call){more}\n'
                  'hermes-call ::= "<tool_call>\\n" tool-call "\\n</tool_call>"',
        "llama3": f'root ::= tool-call ("; " tool-call){more}',
        "mistral": f'root ::= "[TOOL_CALLS][" tool-call (", " tool-call){more} "]"',
        "generic": f'root ::= "{{\\"tool_calls\\": [" tool-call (", " tool-call){more} "]}}"',
    }
    triggers: dict[Format, tuple[str, ...]] = {
        "hermes": (r"<tool_call>",),
        # a JSON object as the answer's start: the grammar starts at its brace (the group)
        "llama3": (r"^\s*(\{)[\s\S]*$",),
        "mistral": (r"\[TOOL_CALLS\]",),
        "generic": (),
    }
    return GrammarPlan(roots[fmt], () if choice.forced else triggers[fmt])


def call_grammar(plan: GrammarPlan, call_gbnf: str) -> str:
    """``call_gbnf`` (json_schema_to_gbnf's output for ``call_schema``) under ``plan``'s root."""
    renamed = re.sub(r"^root ::=", "tool-call ::=", call_gbnf, flags=re.MULTILINE)
    return f"{plan.root}\n{renamed}"


def validate_arguments(tool: Tool, arguments: str) -> str | None:
    """Why ``arguments`` do not satisfy ``tool``'s schema (None: they do)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg})"
    try:
        jsonschema.validate(value, dict(tool.parameters))
    except jsonschema.ValidationError as exc:
        return str(exc.message)
    return None


# -- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # the JSON text as the model wrote it; partial until the call is complete


@dataclass(frozen=True)
class Parsed:
    content: str
    calls: tuple[ParsedCall, ...] = ()


class _Incomplete(Exception):
    """The text ends inside the construct being read."""


class _Invalid(Exception):
    """The text is not the construct being read."""


_WS = " \t\r\n"
_MISTRAL_TAG = "[TOOL_CALLS]"


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _json_end(text: str, i: int) -> int:
    """The end of the JSON value starting at ``text[i]``. Raises _Incomplete/_Invalid."""
    if i >= len(text):
        raise _Incomplete
    c = text[i]
    if c == '"':
        j = i + 1
        while j < len(text):
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                return j + 1
            j += 1
        raise _Incomplete
    if c in "{[":
        depth, j, in_str = 0, i, False
        while j < len(text):
            ch = text[j]
            if in_str:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        raise _Incomplete
    m = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|null").match(text, i)
    if m is None:
        if any(w.startswith(text[i:]) for w in ("true", "false", "null")):
            raise _Incomplete
        raise _Invalid
    if m.end() == len(text):
        raise _Incomplete  # a number may go on
    return m.end()


@dataclass
class _Object:
    """A call object read so far: its end (None: incomplete), its name, its arguments span."""

    end: int | None = None
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    keys: dict[str, Any] = field(default_factory=dict)


def _read_object(text: str, i: int, args_keys: tuple[str, ...]) -> _Object:
    """Read the JSON object at ``text[i]`` key by key, keeping what is complete. Raises
    _Invalid when it is not an object."""
    if i >= len(text) or text[i] != "{":
        raise _Invalid
    obj = _Object()
    j = _skip_ws(text, i + 1)
    if j < len(text) and text[j] == "}":
        obj.end = j + 1
        return obj
    while True:
        try:
            key_end = _json_end(text, j)
        except _Incomplete:
            return obj
        if text[j] != '"':
            raise _Invalid
        key = json.loads(text[j:key_end])
        j = _skip_ws(text, key_end)
        if j >= len(text):
            return obj
        if text[j] != ":":
            raise _Invalid
        j = _skip_ws(text, j + 1)
        if j >= len(text):
            return obj
        if key in args_keys:
            if text[j] != "{":
                raise _Invalid  # arguments are an object
            obj.args_start = j
        try:
            value_end = _json_end(text, j)
        except _Incomplete:
            return obj
        value = json.loads(text[j:value_end])
        obj.keys[key] = value
        if key == "name":
            if not isinstance(value, str):
                raise _Invalid
            obj.name = value
        if key in args_keys:
            obj.args_end = value_end
        j = _skip_ws(text, value_end)
        if j >= len(text):
            return obj
        if text[j] == "}":
            obj.end = j + 1
            return obj
        if text[j] != ",":
            raise _Invalid
        j = _skip_ws(text, j + 1)


def _call(text: str, obj: _Object, final: bool, names: frozenset[str]) -> ParsedCall | None:
    """The call ``obj`` makes, as far as it is known: None until its name is complete (or
    when it names no offered tool)."""
    if obj.name is None or obj.name not in names:
        return None
    if obj.args_start is None:
        if obj.end is None and not final:
            return ParsedCall(obj.name, "")
        return ParsedCall(obj.name, "{}")  # a call without arguments
    end = obj.args_end if obj.args_end is not None else len(text)
    return ParsedCall(obj.name, text[obj.args_start:end])


def partial_marker(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could begin ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolParser:
    """Finds the calls of one format in an answer; ``max_calls`` (1 for
    ``parallel_tool_calls: false``) drops the rest."""

    def __init__(self, fmt: Format, names: Sequence[str], *, max_calls: int | None = None
                 ) -> None:
        self.format = fmt
        # a call to a tool the request did not offer is not a call: it stays text
        self.names = frozenset(names)
        self.max_calls = max_calls
        self._args_keys = ("arguments", "parameters")

    def parse(self, text: str, *, final: bool) -> Parsed:
        content, calls = {
            "hermes": self._hermes, "llama3": self._llama3, "mistral": self._mistral,
            "generic": self._generic,
        }[self.format](text, final)
        if self.max_calls is not None:
            calls = calls[: self.max_calls]
        stripped = content.strip() if final else content.lstrip()
        if not final:
            stripped = stripped.rstrip(_WS)  # trailing blanks wait: they may end the content
        return Parsed(stripped, tuple(calls))

    # Each format returns (content so far, calls so far).

    def _hermes(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        open_, close = "<tool_call>", "</tool_call>"
        content: list[str] = []
        calls: list[ParsedCall] = []
        pos = 0
        while True:
            k = text.find(open_, pos)
            if k < 0:
                tail = text[pos:]
                content.append(tail if final else tail[: len(tail) - partial_marker(tail, open_)])
                break
            content.append(text[pos:k])
            start = _skip_ws(text, k + len(open_))
            try:
                obj = _read_object(text, start, self._args_keys) if start < len(text) else (
                    _Object())
            except _Invalid:
                content.append(text[k:start])  # not a call: the marker stays text
                pos = start
                continue
            call = _call(text, obj, final, self.names)
            if obj.end is None:
                if call is not None:
                    calls.append(call)
                elif final:
                    content.append(text[k:])
                break
            after = _skip_ws(text, obj.end)
            if text.startswith(close, after):
                pos = after + len(close)
            elif close.startswith(text[after:]):
                pos = len(text)  # the closing tag is still arriving (or was cut off)
            else:
                pos = obj.end  # tolerated: a missing closing tag
            if call is None:
                content.append(text[k:pos])
            else:
                calls.append(call)
        return "".join(content), calls

    def _json_calls(self, text: str, i: int, final: bool, sep: str
                    ) -> tuple[list[ParsedCall], int | None]:
        """Call objects from ``text[i]`` on, separated by ``sep`` (and blanks), until something
        else. Returns the calls and where they end (None: the text ends inside them)."""
        calls: list[ParsedCall] = []
        j = i
        while True:
            obj = _read_object(text, j, self._args_keys)
            call = _call(text, obj, final, self.names)
            if obj.end is None:
                if call is not None:
                    calls.append(call)
                return calls, None
            if call is None:
                raise _Invalid
            calls.append(call)
            j = _skip_ws(text, obj.end)
            if j < len(text) and text[j] in sep:
                j = _skip_ws(text, j + 1)
                if j >= len(text):
                    return calls, None
                continue
            return calls, obj.end

    def _llama3(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        tag = "<|python_tag|>"
        k = text.find(tag)
        head = text[:k] if k >= 0 else ""
        start = _skip_ws(text, k + len(tag)) if k >= 0 else _skip_ws(text, 0)
        if k < 0 and (start >= len(text) or text[start] != "{"):
            if not final and start >= len(text):
                return "", []
            if not final:
                return text[: len(text) - partial_marker(text, tag)], []
            return text, []
        return self._leading_json(text, start, final, head, ";")

    def _leading_json(self, text: str, start: int, final: bool, head: str, sep: str
                      ) -> tuple[str, list[ParsedCall]]:
        """Calls as JSON objects from ``start`` to the end; text that turns out not to be calls
        is content (held back while undecided)."""
        if start >= len(text):
            return (text if final else head), []
        try:
            calls, end = self._json_calls(text, start, final, sep)
        except _Invalid:
            return text, []
        if not calls:
            return (text if final else head), []
        rest = "" if end is None else text[end:]
        return head + rest, calls

    def _mistral(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        tag = _MISTRAL_TAG
        k = text.find(tag)
        if k < 0:
            start = _skip_ws(text, 0)
            if not final and tag.startswith(text[start:]):
                return "", []
            if start < len(text) and text[start] == "[":  # the marker rendered as nothing
                return self._mistral_array(text, start, final, "")
            if not final and start >= len(text):
                return "", []
            return (text if final else text[: len(text) - partial_marker(text, tag)]), []
        head = text[:k]
        start = _skip_ws(text, k + len(tag))
        if start >= len(text):
            return (text if final else head), []
        if text[start] == "[":
            return self._mistral_array(text, start, final, head)
        return self._mistral_named(text, start, final, head)

    def _mistral_array(self, text: str, start: int, final: bool, head: str
                       ) -> tuple[str, list[ParsedCall]]:
        i = _skip_ws(text, start + 1)
        if i >= len(text):
            return (text if final else head), []
        try:
            calls, end = self._json_calls(text, i, final, ",")
        except _Invalid:
            return text, []
        if end is not None:
            close = _skip_ws(text, end)
            end = close + 1 if close < len(text) and text[close] == "]" else end
        return head + ("" if end is None else text[end:]), calls

    def _mistral_named(self, text: str, start: int, final: bool, head: str
                       ) -> tuple[str, list[ParsedCall]]:
        calls: list[ParsedCall] = []
        pos = start
        marker = "[ARGS]"
        while True:
            k = text.find(marker, pos)
            if k < 0:
                if final and not calls:
                    return text, []
                return head, calls
            name = text[pos:k].strip()
            if name not in self.names:
                return (text, []) if not calls else (head + text[pos:], calls)
            i = _skip_ws(text, k + len(marker))
            try:
                end = _json_end(text, i)
            except _Incomplete:
                if i < len(text) and text[i] == "{":
                    calls.append(ParsedCall(name, text[i:]))
                elif final:
                    calls.append(ParsedCall(name, "{}"))
                return head, calls
            except _Invalid:
                return (text, []) if not calls else (head + text[pos:], calls)
            calls.append(ParsedCall(name, text[i:end]))
            nxt = text.find(_MISTRAL_TAG, end)
            if nxt < 0:
                tail = text[end:]
                held = 0 if final else partial_marker(tail, _MISTRAL_TAG)
                return head + tail[: len(tail) - held], calls
            pos = nxt + len(_MISTRAL_TAG)

    def _generic(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        start = _skip_ws(text, 0)
        if start >= len(text):
            return "", []
        if text[start] != "{":
            return text, []
        try:
            obj = _read_object(text, start, ())
        except _Invalid:
            return text, []
        # {"tool_calls": [...]} is read call by call, so a stream shows each call early
        m = re.compile(r'\{\s*"tool_calls"\s*:\s*\[\s*').match(text, start)
        if m is not None:
            try:
                calls, end = self._json_calls(text, m.end(), final, ",") if m.end() < len(
                    text) else ([], None)
            except _Invalid:
                return text, []
            return ("" if end is None or obj.end is None else text[obj.end:]), calls
        if obj.end is None:
            return (text if final else ""), []
        if isinstance(obj.keys.get("tool_call"), dict):
            inner = _read_object(text, _inner_start(text, start, "tool_call"), self._args_keys)
            call = _call(text, inner, True, self.names)
            return text[obj.end:], [call] if call else []
        if isinstance(obj.keys.get("response"), str):
            return obj.keys["response"] + text[obj.end:], []
        return text, []


def _inner_start(text: str, start: int, key: str) -> int:
    m = re.compile(r'"' + re.escape(key) + r'"\s*:\s*').search(text, start)
    assert m is not None
    return m.end()


# -- streaming -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    fragment: str


@dataclass(frozen=True)
class Content:
    text: str


Delta = Content | CallStart | CallArguments


def new_call_id() -> str:
    return f"call_{random_hex(12)}"


class ToolStream:
    """Successive parses of a growing answer → the deltas not yet sent. ``ids`` holds each
    call's id, so the non-streamed answer (``final``) can use the same ones."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.ids: list[str] = []
        self._content = 0
        self._args: list[int] = []

    def update(self, text: str, *, final: bool = False) -> list[Delta]:
        parsed = self.parser.parse(text, final=final)
        out: list[Delta] = []
        if len(parsed.content) > self._content:
            out.append(Content(parsed.content[self._content:]))
            self._content = len(parsed.content)
        for index, call in enumerate(parsed.calls):
            if index >= len(self.ids):
                self.ids.append(new_call_id())
                self._args.append(0)
                out.append(CallStart(index, self.ids[index], call.name))
            if len(call.arguments) > self._args[index]:
                out.append(CallArguments(index, call.arguments[self._args[index]:]))
                self._args[index] = len(call.arguments)
        return out
