"""The sampler chain ``sampling.plan_chain`` plans, built with llama.cpp's llama_sampler_* calls,
and the checks of a request's sampling that need the loaded model (``prepare``). Kept apart from
``sampling`` so that the planning, and the servers and tests that use it, import no llama_cpp.
"""

from __future__ import annotations

import ctypes
import math
import re
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np

from llmserve.engine.model import LoadedModel
from llmserve.engine.sampling import SamplerStep, VocabFacts, compile_params, plan_chain
from llmserve.engine.types import SamplingParams
from llmserve.errors import GrammarDeadEnd, InvalidRequest


def vocab_facts(model: LoadedModel) -> VocabFacts:
    return VocabFacts(n_vocab=model.n_vocab, n_ctx=model.n_ctx, eog_tokens=model.eog_tokens)



def prepare(params: SamplingParams, model: LoadedModel) -> SamplingParams:
    """Check everything about ``params`` that needs the model, before the request reaches the
    worker thread: token ids, sampler names, the JSON schema and the grammar (parsed by
    llama.cpp against the vocabulary). Returns ``params`` with the schema compiled into
    ``grammar``. Raises InvalidRequest. Thread-safe: it reads the vocabulary only."""
    name = "grammar" if params.grammar else "json_schema"
    params = compile_params(params, vocab_facts(model))
    if not params.grammar:
        return params
    grammar = llama_cpp.llama_sampler_init_grammar(model.vocab, params.grammar.encode(), b"root")
    if not grammar:
        what = ("GBNF syntax error, an undefined rule, left recursion or no 'root' rule"
                if name == "grammar" else "the grammar made from it does not parse")
        raise InvalidRequest(f"invalid '{name}': llama.cpp could not parse it ({what})",
                             param=name)
    llama_cpp.llama_sampler_free(grammar)
    return params


_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
# samplers that change logits in place and keep every candidate
_IN_PLACE = frozenset({"logit_bias", "penalties", "dry"})
_SHORTLIST = 64


class Sampler:
    """One request's sampler chain (and grammar). Owned by the worker thread; ``free`` it when
    done. Raises InvalidRequest when the grammar does not parse (``prepare`` checks first)."""

    def __init__(self, params: SamplingParams, model: LoadedModel) -> None:
        self.plan = plan_chain(params, vocab=vocab_facts(model))
        self._n_vocab = model.n_vocab
        self._ignore_eos = params.ignore_eos
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain: Any = llama_cpp.llama_sampler_chain_init(chain_params)
        self._grammar: Any = None
        for step in self.plan.steps:
            llama_cpp.llama_sampler_chain_add(self._chain, self._build(step, model))
        self._model = model
        # A lazy grammar (``grammar_triggers``) waits, unconstrained, for a trigger in the text
        # generated so far (``_watch``). llama.cpp's own lazy sampler
        # (llama_sampler_init_grammar_lazy_patterns) is not used: when the token that completes
        # its trigger carries text the grammar refuses, it throws a C++ exception, which
        # through ctypes aborts the whole server.
        self._triggers = [re.compile(t) for t in params.grammar_triggers]
        self._generated = ""
        if self.plan.grammar is not None:
            self._candidates = np.zeros(model.n_vocab, dtype=_TOKEN_DATA)
            self._token_ids = np.arange(model.n_vocab, dtype=np.int32)
            if not self._triggers:
                self._grammar = self._new_grammar()
        # The shortcut is exact only when the chain before ``greedy`` changes logits in place
        # and drops no candidate (no typical/XTC), and the shortlist is smaller than the
        # vocabulary.
        self._greedy_shortcut = (self.plan.names[-1:] == ["greedy"]
                                 and set(self.plan.names) <= _IN_PLACE | {"greedy"}
                                 and model.n_vocab > _SHORTLIST)

    def _new_grammar(self) -> Any:
        assert self.plan.grammar is not None
        grammar = llama_cpp.llama_sampler_init_grammar(self._model.vocab,
                                                       self.plan.grammar.encode(), b"root")
        if not grammar:
            self.free()
            raise InvalidRequest("invalid 'grammar': llama.cpp could not parse it",
                                 param="grammar")
        return grammar

    def _watch(self, token: int) -> None:
        """While a lazy grammar waits: once the generated text matches a trigger, start the
        grammar on the text from the trigger (its first group, else the match) on. Each
        token of that text is checked before the grammar takes it; if the model already
        wrote something the grammar refuses, the grammar is given up (the output is then
        parsed as it is) rather than fed text it cannot take."""
        self._generated += self._model.token_to_piece(token, special=True).decode(
            "utf-8", "replace")
        for trigger in self._triggers:
            match = trigger.search(self._generated)
            if match is None:
                continue
            start = match.start(1) if match.re.groups and match.start(1) >= 0 else match.start()
            self._triggers = []
            grammar = self._new_grammar()
            for piece in self._model.tokenize(self._generated[start:], add_special=False,
                                              parse_special=True):
                self._grammar = grammar
                if not self._allowed(np.array([piece], dtype=np.int32))[0]:
                    llama_cpp.llama_sampler_free(grammar)
                    self._grammar = None
                    return
                llama_cpp.llama_sampler_accept(grammar, piece)
            return

    @staticmethod
    def _build(step: SamplerStep, model: LoadedModel) -> Any:
        a = step.args
        match step.name:
            case "logit_bias":
                pairs: Sequence[tuple[int, float]] = a[0]
                arr = (llama_cpp.llama_logit_bias * len(pairs))(
                    *(llama_cpp.llama_logit_bias(token, bias) for token, bias in pairs)
                )
                # llama.cpp copies the array
                return llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(pairs), arr)
            case "penalties":
                return llama_cpp.llama_sampler_init_penalties(model.n_vocab, *a)
            case "dry":
                breakers = [b.encode("utf-8") for b in a[4]]
                c_breakers = (ctypes.c_char_p * max(len(breakers), 1))(*breakers)
                # llama_sampler_init_dry copies the strings; the buffers only need to outlive
                # the call, which ``breakers`` and ``c_breakers`` do.
                return llama_cpp.llama_sampler_init_dry(
                    model.vocab, a[0], a[1], a[2], a[3], c_breakers, len(breakers)
                )
            case "top_n_sigma":
                return llama_cpp.llama_sampler_init_top_n_sigma(*a)
            case "top_k":
                return llama_cpp.llama_sampler_init_top_k(*a)
            case "typical":
                return llama_cpp.llama_sampler_init_typical(*a)
            case "top_p":
                return llama_cpp.llama_sampler_init_top_p(*a)
            case "min_p":
                return llama_cpp.llama_sampler_init_min_p(*a)
            case "xtc":
                return llama_cpp.llama_sampler_init_xtc(*a)
            case "temp_ext":
                return llama_cpp.llama_sampler_init_temp_ext(*a)
            case "temp":
                return llama_cpp.llama_sampler_init_temp(*a)
            case "mirostat":
                return llama_cpp.llama_sampler_init_mirostat(*a)
            case "mirostat_v2":
                return llama_cpp.llama_sampler_init_mirostat_v2(*a)
            case "dist":
                return llama_cpp.llama_sampler_init_dist(*a)
            case "greedy":
                return llama_cpp.llama_sampler_init_greedy()
        raise ValueError(f"unknown sampler {step.name!r}")

    def accept_history(self, tokens: Sequence[int]) -> None:
        """Feed the prompt's last tokens to the chain's look-back samplers (penalties, DRY),
        as llama-server does; never to the grammar."""
        window = self.plan.history_window
        if window:
            for token in tokens[-window:]:
                llama_cpp.llama_sampler_accept(self._chain, token)

    def sample(self, ctx: Any, index: int) -> int:
        """Sample from the logits of batch position ``index`` and accept the token. Raises
        GrammarDeadEnd when the grammar and the request's bans leave no token."""
        if self._grammar is None:
            token = int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))
            if self._triggers:
                self._watch(token)
            return token
        token = self._sample_constrained(ctx, index)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def _sample_constrained(self, ctx: Any, index: int) -> int:
        # common_sampler_sample's rejection sampling: try the chain alone, keep its pick if the
        # grammar allows it, else apply the grammar first and sample again.
        token = self._apply(ctx, index, with_grammar=False)
        if self._allowed(np.array([token], dtype=np.int32))[0]:
            return token
        if self._greedy_shortcut:
            best = self._best_allowed()
            if best is not None:
                return best
        return self._apply(ctx, index, with_grammar=True)

    def _allowed(self, tokens: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Which of ``tokens`` the grammar allows next (it checks each independently)."""
        probe = np.zeros(len(tokens), dtype=_TOKEN_DATA)
        probe["id"] = tokens
        probe["logit"] = 1.0
        data = probe.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        arr = llama_cpp.llama_token_data_array(data, len(tokens), -1, False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        return probe["logit"] != -math.inf  # type: ignore[no-any-return]

    def _best_allowed(self) -> int | None:
        """A greedy chain's pick under the grammar without checking the whole vocabulary: the
        most likely of the top candidates (logits as the chain left them: biased, penalised)
        that the grammar allows, which is exactly what applying the grammar first and then the
        chain picks. None when none of them is allowed (then the full check runs). A rejected
        greedy pick costs a check of ``_SHORTLIST`` tokens instead of every token (49k for
        SmolLM2): tool-call grammars reject the model's pick often at their fixed text."""
        logits = self._candidates["logit"]
        top = np.argpartition(-logits, _SHORTLIST)[:_SHORTLIST]
        top = top[np.argsort(-logits[top], kind="stable")]
        top = top[logits[top] != -math.inf]
        allowed = self._allowed(self._candidates["id"][top])
        if not allowed.any():
            return None
        return int(self._candidates["id"][top[int(np.argmax(allowed))]])

    def _apply(self, ctx: Any, index: int, *, with_grammar: bool) -> int:
        logits = llama_cpp.llama_get_logits_ith(ctx, index)
        cand = self._candidates
        cand["id"] = self._token_ids  # the previous pass left them sorted and cut
        cand["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        cand["p"] = 0.0
        data = cand.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        arr = llama_cpp.llama_token_data_array(data, self._n_vocab, -1, False)
        if with_grammar:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(arr))
        if arr.selected < 0 or arr.data[arr.selected].logit == -math.inf:
            raise self._dead_end()
        return int(arr.data[arr.selected].id)

    def _dead_end(self) -> GrammarDeadEnd:
        # Only the request's own constraints remove tokens outright (the grammar, logit_bias
        # bans, ignore_eos): the samplers after them always keep one.
        why = ("; ignore_eos bans the end of generation, which is all a complete match allows"
               if self._ignore_eos else
               " (logit_bias bans every token it allows, or no token spells what it requires)")
        return GrammarDeadEnd(
            f"invalid 'grammar': after the text generated so far it allows no token{why}",
            param="grammar",
        )

    def free(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
