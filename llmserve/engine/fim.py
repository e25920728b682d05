"""Fill-in-the-middle prompts from the vocabulary's FIM tokens, as llama-server's /infill builds
them (``format_prompt_infill``): the repository and extra files first (``<FIM_REP>``,
``<FIM_SEP>`` where the vocabulary has them), then BOS when the vocabulary adds one, then
``<FIM_PRE> prefix prompt <FIM_SUF> suffix <FIM_MID>``; the model writes the middle.

Unlike llama-server nothing is cut to fit: a prompt too long for the context is refused
(context_length_exceeded), as on every other route. Pure: the engine hands in its tokenizer, so
the layout is tested without a model (tests/test_fim.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# llama-server separates extra chunks this way when the vocabulary has no FIM_SEP token.
CHUNK_SEPARATOR = "\n\n--- snippet ---\n\n"
# the fixed project and file names llama-server's /infill writes (its API takes neither)
PROJECT = "myproject\n"
CURRENT_FILE = "filename\n"


@dataclass(frozen=True)
class FimTokens:
    """A vocabulary's FIM token ids (llama_vocab_fim_*); ``rep``/``sep`` (repository and file
    separators) and ``bos`` (when the vocabulary adds one) are optional."""

    pre: int
    suf: int
    mid: int
    rep: int | None = None
    sep: int | None = None
    bos: int | None = None


@dataclass(frozen=True)
class ExtraFile:
    """One of /infill's ``input_extra`` chunks: context from another file."""

    text: str
    filename: str = "tmp"


def infill_prompt(
    fim: FimTokens, tokenize: Callable[[str], list[int]], *, prefix: str, suffix: str,
    prompt: str = "", extra: Sequence[ExtraFile] = (),
) -> list[int]:
    """The token ids of one FIM prompt; ``tokenize`` turns text into ids without special
    tokens added (special tokens written in the text are kept, as llama-server does)."""
    head: list[int] = []
    if fim.rep is not None:
        head += [fim.rep, *tokenize(PROJECT)]
    for chunk in extra:
        if fim.sep is not None:
            head += [fim.sep, *tokenize(chunk.filename + "\n")]
        else:
            head += tokenize(CHUNK_SEPARATOR)
        head += tokenize(chunk.text)
    if fim.sep is not None:
        head += [fim.sep, *tokenize(CURRENT_FILE)]
    bos = [fim.bos] if fim.bos is not None else []
    return [*head, *bos, fim.pre, *tokenize(prefix), *tokenize(prompt), fim.suf,
            *tokenize(suffix), fim.mid]
