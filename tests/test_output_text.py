"""Tier 1: UTF-8 assembly and stop strings, without a model."""

from __future__ import annotations

import pytest

from llmserve.engine.output_text import OutputText
from llmserve.engine.placement import common_prefix_len


def feed(out: OutputText, pieces: list[bytes]) -> str:
    return "".join(out.push(p) for p in pieces) + out.flush()


def test_multibyte_character_split_across_tokens_is_never_split() -> None:
    out = OutputText()
    snowman = "☃".encode()
    assert out.push(b"a" + snowman[:1]) == "a"
    assert out.push(snowman[1:2]) == ""
    assert out.push(snowman[2:]) == "☃"


@pytest.mark.parametrize(
    ("pieces", "stop", "shown", "word"),
    [
        pytest.param([b"Hello", b" wor", b"ld", b"!"], ["world"], "Hello ", "world", id="across"),
        pytest.param([b"abc", b"STO", b"P", b"tail"], ["STOP"], "abc", "STOP", id="split-stop"),
        pytest.param([b"ab", b"S", b"x"], ["STOP"], "abSx", None, id="false-start"),
        pytest.param([b"a\n\nb"], ["\n\n", "b"], "a", "\n\n", id="earliest-wins"),
        pytest.param([b"xyz"], ["q"], "xyz", None, id="no-stop"),
        pytest.param([b"ab", b"ST"], ["STOP"], "abST", None, id="held-then-flushed"),
    ],
)
def test_stop_strings(pieces: list[bytes], stop: list[str], shown: str, word: str | None) -> None:
    out = OutputText(stop)
    assert feed(out, pieces) == shown
    assert out.stop_word == word


def test_partial_stop_is_held_back_until_resolved() -> None:
    out = OutputText(["STOP"])
    assert out.push(b"abST") == "ab"
    assert out.push(b"OP") == ""
    assert out.stop_word == "STOP"


@pytest.mark.parametrize(
    ("a", "b", "n"), [([], [1], 0), ([1, 2, 3], [1, 2, 4], 2), ([1, 2], [1, 2, 3], 2),
                      ([5], [6], 0)],
)
def test_common_prefix_len(a: list[int], b: list[int], n: int) -> None:

    assert common_prefix_len(a, b) == n
