"""llama.cpp's native wire models (llama-server's /completion, /tokenize, /detokenize,
/apply-template). No I/O here.

Field names are llama-server's. Unknown keys are ignored (SillyTavern forwards its whole settings
object). The leniencies real clients rely on (``n_predict`` 0 or -1, ``stop`` and
``stopping_strings``, ``seed`` -1, ``grammar`` "", ``logit_bias`` as pairs or an object, ...)
are params' rules, shared by every route family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from llmserve.params import Family
from llmserve.protocol.openai import ChatMessage
from llmserve.protocol.sampling import LlamaCppSampling


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CompletionRequest(_Request, LlamaCppSampling):
    """POST /completion (llama-server's native completion)."""

    FAMILY: ClassVar[Family] = "llamacpp"
    RENAMES: ClassVar[Mapping[str, str]] = {
        "max_tokens": "n_predict", "max_new_tokens": "n_predict", "num_predict": "n_predict",
        "stopping_strings": "stop",
    }

    prompt: str | list[int | str]
    stream: bool = False
    n_predict: int | None = None
    max_tokens: int | None = None
    max_new_tokens: int | None = None
    num_predict: int | None = None
    stopping_strings: Any = None
    n_probs: int | None = None
    cache_prompt: bool = True
    return_tokens: bool = False
    # swipes: several completions of one prompt
    n: int = Field(default=1, ge=1, le=16)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int | str]) -> str | list[int | str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("the prompt is empty")
            if all(isinstance(p, str) for p in v) and len(v) > 1:
                raise ValueError("one prompt per request: a string, or a list of token ids "
                                 "(strings may be mixed in)")
            if any(isinstance(p, int) and p < 0 for p in v):
                raise ValueError("token ids must not be negative")
        return v


class InfillChunk(_Request):
    """One of /infill's ``input_extra`` entries: context from another file."""

    text: str
    filename: str = "tmp"


class InfillRequest(CompletionRequest):
    """POST /infill (llama-server's): fill in between ``input_prefix`` and ``input_suffix``;
    ``prompt`` is text the middle starts with; ``input_extra`` other files for context."""

    prompt: str = ""
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillChunk] = Field(default_factory=list)


class TokenizeRequest(_Request):
    """POST /tokenize. ``add_special`` defaults to true (llama-server: false) so that the count
    is exactly what /completion evaluates for the same text."""

    # ``prompt``: vLLM's name for it
    content: str = Field(validation_alias=AliasChoices("content", "prompt"))
    model: str | None = None
    add_special: bool = True
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Request):
    tokens: list[int]
    model: str | None = None


class ApplyTemplateRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    # rendered as /v1/chat/completions would (server/chat_plan.py checks them)
    tools: Any = None
    tool_choice: Any = None
    chat_template_kwargs: Any = None
