"""OpenAI's two logprobs shapes, from the engine's TokenEvents.

The values are llama.cpp's n_probs path (``Scheduler._logprobs``, shared with llama-server's
/completion): a log-softmax of the model's raw logits for the position, before any sampling
transform (temperature, penalties, top-k/p, grammar), as llama-server reports them. The engine
computes max(top, 1) alternatives; each renderer shows ``top`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmserve.engine.types import EngineProtocol, TokenEvent
from llmserve.protocol import openai as oa


class ChatLogprobs:
    """Chat's ``choices[].logprobs``: ``content`` holds one entry per token (token text,
    log p, UTF-8 bytes and the ``top`` most likely alternatives)."""

    def __init__(self, engine: EngineProtocol, top: int) -> None:
        self._engine = engine
        self._top = top

    def _entry(self, token: int, logprob: float) -> oa.TopLogprob:
        raw = self._engine.token_bytes(token)
        return oa.TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob,
                             bytes=list(raw))

    def render(self, events: Sequence[TokenEvent]) -> oa.ChoiceLogprobs:
        content: list[oa.TokenLogprob] = []
        for ev in events:
            assert ev.logprob is not None
            own = self._entry(ev.token_id, ev.logprob)
            content.append(oa.TokenLogprob(
                **own.model_dump(),
                top_logprobs=[self._entry(t, lp) for t, lp in ev.top_logprobs[:self._top]],
            ))
        return oa.ChoiceLogprobs(content=content)


class CompletionLogprobs:
    """/v1/completions' ``choices[].logprobs``: parallel lists of token texts, their log p,
    a {text: log p} map of the ``top`` alternatives, and each token's offset in the choice's
    text. One per choice: it counts the offset on across the chunks of a stream."""

    def __init__(self, engine: EngineProtocol, top: int, offset: int = 0) -> None:
        self._engine = engine
        self._top = top
        self._offset = offset

    def _text(self, token: int) -> str:
        return self._engine.token_bytes(token).decode("utf-8", errors="replace")

    def render(self, events: Sequence[TokenEvent]) -> oa.CompletionLogprobs:
        out = oa.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[],
                                    text_offset=[])
        for ev in events:
            assert ev.logprob is not None
            text = self._text(ev.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(ev.logprob)
            out.top_logprobs.append({self._text(t): lp for t, lp in ev.top_logprobs[:self._top]})
            out.text_offset.append(self._offset)
            self._offset += len(text)
        return out
