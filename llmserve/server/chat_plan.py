"""One chat request's tools, template options, assistant prefill and reasoning split, from
request to response.

A ChatPlan is made (and every field checked, so a bad one is a 400 before any token) when the
request is read; ``build`` renders the prompt once the engine is known (the template decides
the tool format), ``constrain`` adds the grammar that forces a call, ``output`` parses the
answer. ``chunks`` and ``message`` render it in OpenAI's shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmserve.chat_output import Answer, ChatOutput, Reasoning
from llmserve.engine.types import EngineProtocol, Finish, SamplingParams
from llmserve.errors import InvalidRequest, InvalidToolCall
from llmserve.reasoning import REASONING_FORMATS, ReasoningFormat, ReasoningSplitter
from llmserve.tool_calls import (
    CallArguments,
    CallStart,
    Content,
    Delta,
    Format,
    Tool,
    ToolChoice,
    ToolParser,
    call_grammar,
    call_schema,
    check_tool_messages,
    detect_format,
    grammar_plan,
    parse_tool_choice,
    parse_tools,
    template_messages,
    validate_arguments,
    with_generic_prompt,
)

# what the renderer passes itself: chat_template_kwargs may not replace these
_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                       "raise_exception", "strftime_now"})


@dataclass(frozen=True)
class ChatDefaults:
    """The server's defaults (``--tool-parser``, ``--chat-template-kwargs``,
    ``--reasoning-format``)."""

    tool_parser: Format | None = None
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    reasoning_format: ReasoningFormat = "auto"


def template_kwargs(value: Any, param: str = "chat_template_kwargs") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"invalid '{param}': must be a JSON object", param=param)
    clash = sorted(_RESERVED & value.keys())
    if clash:
        raise InvalidRequest(f"invalid '{param}': {', '.join(clash)} cannot be set here",
                             param=param)
    return dict(value)


def split_prefill(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """The messages to render and the assistant prefill to continue (None: none).

    As llama-server (and Ollama): a trailing assistant message with text and no tool calls is
    the start of the answer, not a finished turn. The prompt is the template over the earlier
    messages with the generation prompt, then that text; the model continues it and the answer
    holds only the new text. ``prefix: true`` (Mistral's and DeepSeek's flag, which LiteLLM's
    mid-stream continuation sends) says so explicitly and is refused anywhere else;
    ``prefix: false`` on the trailing message renders it as a finished turn instead.
    """
    last = len(messages) - 1
    for i, m in enumerate(messages):
        flag = m.get("prefix")
        if flag is None:
            continue
        param = f"messages[{i}].prefix"
        if not isinstance(flag, bool):
            raise InvalidRequest(f"invalid '{param}': must be true or false", param=param)
        if flag and (i != last or m.get("role") != "assistant" or m.get("tool_calls")):
            raise InvalidRequest(f"invalid '{param}': only the last message can be a prefix, and "
                                 "only an assistant message without tool_calls", param=param)
    if not messages:
        return messages, None
    tail = messages[-1]
    if tail.get("role") != "assistant" or tail.get("tool_calls") or tail.get("prefix") is False:
        return messages, None
    return messages[:-1], tail.get("content") or ""


def reasoning_format(value: Any, default: ReasoningFormat) -> ReasoningFormat:
    if value is None:
        return default
    if value not in REASONING_FORMATS:
        raise InvalidRequest(f"invalid 'reasoning_format': must be one of "
                             f"{', '.join(REASONING_FORMATS)}", param="reasoning_format")
    return value  # type: ignore[no-any-return]


class ChatPlan:
    def __init__(
        self,
        messages: list[dict[str, Any]],
        defaults: ChatDefaults,
        *,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: Any = None,
        chat_template_kwargs: Any = None,
        reasoning: Any = None,
    ) -> None:
        check_tool_messages(messages)
        self.messages, self.prefill = split_prefill(template_messages(messages))
        self.tools: tuple[Tool, ...] = parse_tools(tools)
        self.choice: ToolChoice = parse_tool_choice(tool_choice, self.tools)
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise InvalidRequest("invalid 'parallel_tool_calls': must be true or false",
                                 param="parallel_tool_calls")
        self.parallel = parallel_tool_calls is not False
        self.kwargs = {**defaults.chat_template_kwargs, **template_kwargs(chat_template_kwargs)}
        self.reasoning_format = reasoning_format(reasoning, defaults.reasoning_format)
        self._parser_override = defaults.tool_parser
        self.format: Format | None = None
        self._splitter = ReasoningSplitter(False)

    def render(self, engine: EngineProtocol) -> str:
        """The prompt text: the tools through the template when it speaks a tool format,
        else the generic tool prompt in the system message; the assistant prefill after the
        generation prompt."""
        template = engine.info.chat_template or ""
        messages = self.messages
        kwargs = dict(self.kwargs)
        if self.choice.mode != "none":
            self.format = self._parser_override or detect_format(template)
            if self.format == "generic":
                messages = with_generic_prompt(messages, self.tools)
            else:
                kwargs["tools"] = [dict(t.spec) for t in self.tools]
        prompt = engine.format_chat(messages, **kwargs) + (self.prefill or "")
        self._splitter = ReasoningSplitter.plan(self.reasoning_format, template, prompt)
        return prompt

    def build(self, engine: EngineProtocol) -> list[int]:
        return engine.tokenize(self.render(engine), add_special=True)

    def constrain(self, sampling: SamplingParams) -> SamplingParams:
        """The grammar that forces a call (``required``, a named function) or, for ``auto``,
        a lazy one that takes over at the format's call marker. Runs after ``build``."""
        if self.format is None:
            return sampling
        plan = grammar_plan(self.format, self.choice, self.parallel)
        if plan is None:
            return sampling
        if sampling.grammar or sampling.json_schema is not None:
            if self.choice.forced:
                raise InvalidRequest("invalid 'tool_choice': a forced tool call cannot be "
                                     "combined with grammar, json_schema or response_format",
                                     param="tool_choice")
            return sampling  # auto: the client's constraint wins, calls are parsed after
        # imported here: the JSON Schema converter lives in llama_cpp (see compile_json_schema)
        from llmserve.engine.sampling import compile_json_schema

        try:
            gbnf = compile_json_schema(call_schema(self.tools, self.choice, self.format))
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message.replace("'json_schema'", "'tools'"),
                                 param="tools") from None
        return dataclasses.replace(sampling, grammar=call_grammar(plan, gbnf),
                                   grammar_triggers=plan.triggers, json_schema=None)

    def output(self) -> ChatOutput:
        parser = None
        if self.format is not None:
            parser = ToolParser(self.format, [t.name for t in self.tools],
                                max_calls=None if self.parallel else 1)
        return ChatOutput(self._splitter, parser)

    def check(self, answer: Answer) -> None:
        """A ``strict`` tool's arguments must satisfy its schema."""
        strict = {t.name: t for t in self.tools if t.strict}
        for call in answer.calls:
            tool = strict.get(call.name)
            why = validate_arguments(tool, call.arguments) if tool is not None else None
            if why is not None:
                raise InvalidToolCall(f"the model called the strict tool {call.name!r} with "
                                      f"arguments its schema refuses: {why}")


def finish_reason(finish: Finish, answer: Answer) -> str:
    if finish.reason == "length":
        return "length"
    return "tool_calls" if answer.calls else "stop"


def message(answer: Answer) -> dict[str, Any]:
    """The non-streamed ``choices[0].message``."""
    out: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.reasoning is not None:
        out["reasoning_content"] = answer.reasoning
    if answer.calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in answer.calls
        ]
    return out


def delta(piece: Delta | Reasoning) -> dict[str, Any]:
    """One stream delta in OpenAI's shape: a call's first delta carries index, id, type and
    name, later ones the arguments' fragments for that index."""
    if isinstance(piece, Reasoning):
        return {"reasoning_content": piece.text}
    if isinstance(piece, Content):
        return {"content": piece.text}
    if isinstance(piece, CallStart):
        return {"tool_calls": [{"index": piece.index, "id": piece.id, "type": "function",
                                "function": {"name": piece.name, "arguments": ""}}]}
    assert isinstance(piece, CallArguments)
    return {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.fragment}}]}


def collect(plan: ChatPlan, output: ChatOutput, text: str) -> Answer:
    output.feed(text)
    output.finish()
    answer = output.answer()
    plan.check(answer)
    return answer

