"""Can a grammar-constrained request end? Decided before any token is generated, in pure code.

With ``ignore_eos`` the end-of-generation tokens are banned, so a generation ends only at
``max_tokens``, at a stop string or at the context's end. llama.cpp's grammar allows nothing but
end-of-generation once its text is complete (llama-grammar.cpp, ``llama_grammar_apply_impl``),
so a grammar whose longest text is shorter than ``max_tokens`` is a dead end, every time
(``root ::= "a"`` with ``ignore_eos``). Each generated token uses up at least one byte of the
grammar's text (llama.cpp rejects tokens with an empty piece), so the longest text in UTF-8
bytes bounds the tokens.

``max_text_bytes`` reads GBNF as llama.cpp's parser does (llama-grammar.cpp ``parse_sequence``)
and returns None for anything unbounded (``*``, ``+``, ``{m,}``, recursion) or that it does not
read (token literals ``<...>``): then only the sampler's own check, at the token where the dead
end happens, applies.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llmserve.engine.types import GenerationRequest
from llmserve.errors import GrammarDeadEnd

_NAME = re.compile(r"[a-zA-Z0-9-]+")
_INT = re.compile(r"[0-9]+")
_SIMPLE_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]",
                   "-": "-"}
_HEX = {"x": 2, "u": 4, "U": 8}


class _Unreadable(Exception):
    """Grammar text this reader does not handle; the request goes ahead unchecked."""


@dataclass(frozen=True)
class _Ref:
    rule: str


@dataclass(frozen=True)
class _Repeat:
    item: _Node
    high: float  # at most this many times


# Plain data: a fixed size in bytes, a rule reference, alternatives of sequences, a repetition.
_Node = float | _Ref | _Repeat | list[list["_Node"]]


def check_can_end(request: GenerationRequest) -> None:
    """Raise GrammarDeadEnd when ``request`` is certain to reach a point where its grammar
    allows only the end of generation, which ``ignore_eos`` bans."""
    sampling = request.sampling
    if not (sampling.ignore_eos and sampling.grammar) or request.stop or sampling.grammar_triggers:
        return  # a lazy grammar may never start
    longest = max_text_bytes(sampling.grammar)
    if longest is not None and request.max_tokens > longest:
        raise GrammarDeadEnd(
            f"invalid 'grammar': with ignore_eos this generation can only end after "
            f"{request.max_tokens} tokens, but every text the grammar allows is complete within "
            f"{longest} bytes (so within {longest} tokens), after which it allows only the end "
            "of generation that ignore_eos bans. Lower max_tokens, drop ignore_eos, or let the "
            "grammar repeat",
            param="grammar",
        )


def max_text_bytes(grammar: str) -> int | None:
    """The longest text ``grammar`` allows from ``root``, in UTF-8 bytes; None when unbounded
    or not understood."""
    try:
        rules = _Reader(grammar).rules()
        if "root" not in rules:
            return None
        longest = _Sizes(rules).of(_Ref("root"))
    except (_Unreadable, RecursionError):
        return None
    return None if math.isinf(longest) else int(longest)


class _Sizes:
    def __init__(self, rules: dict[str, _Node]) -> None:
        self.rules = rules
        self.done: dict[str, float] = {}
        self.busy: set[str] = set()

    def of(self, node: _Node) -> float:
        if isinstance(node, float):
            return node
        if isinstance(node, _Ref):
            return self._rule(node.rule)
        if isinstance(node, _Repeat):
            if node.high == 0:
                return 0.0
            size = self.of(node.item)
            return 0.0 if size == 0 else size * node.high
        return max(sum(self.of(item) for item in seq) for seq in node)

    def _rule(self, name: str) -> float:
        if name in self.done:
            return self.done[name]
        if name in self.busy or name not in self.rules:  # recursion: unbounded, we assume
            return math.inf
        self.busy.add(name)
        self.done[name] = self.of(self.rules[name])
        self.busy.discard(name)
        return self.done[name]


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def rules(self) -> dict[str, _Node]:
        rules: dict[str, _Node] = {}
        self._space()
        while self.pos < len(self.text):
            name = self._name()
            self._space()
            if not self.text.startswith("::=", self.pos):
                raise _Unreadable
            self.pos += 3
            self._space()
            rules[name] = self._alternates()
            self._space()
        return rules

    def _alternates(self) -> list[list[_Node]]:
        alternatives = [self._sequence()]
        while self._peek() == "|":
            self.pos += 1
            self._space()
            alternatives.append(self._sequence())
        return alternatives

    def _sequence(self) -> list[_Node]:
        items: list[_Node] = []
        while True:
            self._space()
            c = self._peek()
            if c == '"':
                items.append(float(self._literal()))
            elif c == "[":
                items.append(float(self._char_class()))
            elif c == ".":
                self.pos += 1
                items.append(4.0)  # any character: at most 4 bytes
            elif c == "(":
                self.pos += 1
                self._space()
                items.append(self._alternates())
                if self._peek() != ")":
                    raise _Unreadable
                self.pos += 1
            elif c and _NAME.match(c) and not self._starts_rule():
                items.append(_Ref(self._name()))
            elif c and c in "*+?{" and items:
                items[-1] = _Repeat(items[-1], self._repetition())
            elif c and c in "<!":  # token literals
                raise _Unreadable
            else:
                return items  # "|", ")", the next rule or the end; anything else is unread

    def _starts_rule(self) -> bool:
        end = _NAME.match(self.text, self.pos)
        assert end is not None
        rest = self.text[end.end():].lstrip(" \t")
        return rest.startswith("::=")

    def _repetition(self) -> float:
        """The most times the item may repeat."""
        c = self.text[self.pos]
        self.pos += 1
        if c != "{":
            return 1.0 if c == "?" else math.inf
        self._space()
        high: float = self._int()
        self._space()
        if self._peek() == ",":
            self.pos += 1
            self._space()
            high = self._int() if self._peek().isdigit() else math.inf
            self._space()
        if self._peek() != "}":
            raise _Unreadable
        self.pos += 1
        return high

    def _literal(self) -> int:
        self.pos += 1
        size = 0
        while self._peek() != '"':
            size += len(self._char().encode("utf-8", "surrogatepass"))
        self.pos += 1
        return size

    def _char_class(self) -> int:
        self.pos += 1
        if self._peek() == "^":  # anything but these: any character
            size = 4
            while self._peek() != "]":
                self._char()
            self.pos += 1
            return size
        size = 0
        while self._peek() != "]":
            char = self._char()
            if self.text.startswith("-", self.pos) and self.text[self.pos + 1:self.pos + 2] != "]":
                self.pos += 1
                char = self._char()  # a range: its upper end is its longest character
            size = max(size, len(char.encode("utf-8", "surrogatepass")))
        self.pos += 1
        return size

    def _char(self) -> str:
        if self.pos >= len(self.text):
            raise _Unreadable
        c = self.text[self.pos]
        if c != "\\":
            self.pos += 1
            return c
        kind = self.text[self.pos + 1:self.pos + 2]
        if kind in _SIMPLE_ESCAPES:
            self.pos += 2
            return _SIMPLE_ESCAPES[kind]
        if kind in _HEX:
            digits = self.text[self.pos + 2:self.pos + 2 + _HEX[kind]]
            try:
                code = int(digits, 16)
                char = chr(code)
            except ValueError:
                raise _Unreadable from None
            self.pos += 2 + _HEX[kind]
            return char
        raise _Unreadable

    def _name(self) -> str:
        match = _NAME.match(self.text, self.pos)
        if match is None:
            raise _Unreadable
        self.pos = match.end()
        return match.group()

    def _int(self) -> int:
        match = _INT.match(self.text, self.pos)
        if match is None:
            raise _Unreadable
        self.pos = match.end()
        return int(match.group())

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _space(self) -> None:
        # newlines too: a rule's end is found by the next ``name ::=`` (_starts_rule)
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "#":
                while self.pos < len(self.text) and self.text[self.pos] not in "\r\n":
                    self.pos += 1
            elif c in " \t\r\n":
                self.pos += 1
            else:
                return
