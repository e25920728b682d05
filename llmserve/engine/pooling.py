"""Embedding decisions as plain data, tested without a model: which GGUFs are embedding models,
pooling names, how waiting inputs pack into one decode, the rerank prompt, normalisation.

Nothing here imports llama_cpp (embedder.py applies these decisions to a context).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Pooling = Literal["none", "mean", "cls", "last", "rank"]
POOLINGS: tuple[Pooling, ...] = ("none", "mean", "cls", "last", "rank")
# llama.cpp's enum llama_pooling_type (and the GGUF's ``{arch}.pooling_type`` values)
POOLING_IDS: dict[Pooling, int] = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
POOLING_NAMES: dict[int, Pooling] = {v: k for k, v in POOLING_IDS.items()}

# Architectures with no KV cache and bidirectional attention: embedding models whatever their
# metadata says (llama_model::create_memory gives them no memory; they run through encode).
ENCODER_ONLY_ARCHS = frozenset({
    "bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "neo-bert",
    "eurobert", "modern-bert", "gemma-embedding",
})
# A rank head: llama.cpp's build_pooling aborts the process on rank pooling without one.
RANK_HEAD_TENSORS = ("cls.weight", "cls.output.weight")

Vector = npt.NDArray[np.float32]


def gguf_pooling(metadata: Mapping[str, Any]) -> Pooling | None:
    """The pooling a GGUF declares, or None when it declares none."""
    arch = metadata.get("general.architecture")
    value = metadata.get(f"{arch}.pooling_type")
    return POOLING_NAMES.get(value) if isinstance(value, int) else None


def is_embedding_gguf(metadata: Mapping[str, Any]) -> bool:
    """An embedding model by its GGUF: it declares a pooling, or its architecture is
    encoder-only (BERT and its kin)."""
    return (gguf_pooling(metadata) is not None
            or metadata.get("general.architecture") in ENCODER_ONLY_ARCHS)


def has_rank_head(tensor_names: Sequence[str]) -> bool:
    return any(name in tensor_names for name in RANK_HEAD_TENSORS)


def take_batch(lengths: Sequence[int], max_tokens: int, max_seqs: int) -> int:
    """How many of the waiting inputs (their token counts, FIFO, across every request) go into
    the next decode: while their tokens fit ``max_tokens`` and there are at most ``max_seqs``.
    At least one (an input never exceeds ``max_tokens``: the route refuses it first)."""
    used = count = 0
    for n in lengths:
        if count and (used + n > max_tokens or count >= max_seqs):
            break
        used += n
        count += 1
    return count


def rerank_tokens(query: Sequence[int], document: Sequence[int], *, bos: int | None,
                  eos: int | None, sep: int | None) -> list[int]:
    """llama-server's rerank input for a model without a rerank template
    (format_prompt_rerank): [BOS] query [EOS] [SEP] document [EOS], each special only where
    the vocabulary adds it (None: it does not)."""
    out: list[int] = []
    if bos is not None:
        out.append(bos)
    out.extend(query)
    if eos is not None:
        out.append(eos)
    if sep is not None:
        out.append(sep)
    out.extend(document)
    if eos is not None:
        out.append(eos)
    return out


def normalise(vector: Vector, mode: int) -> Vector:
    """llama-server's ``normalize`` (common_embd_normalize): -1 none, 0 max-abs scaled to the
    int16 range, 2 euclidean (unit length), any other p > 0 the p-norm. Over the last axis,
    so a per-token matrix is normalised row by row."""
    x = vector.astype(np.float64)
    if mode == -1:
        return vector
    if mode == 0:
        norm = np.abs(x).max(axis=-1, keepdims=True) / 32760.0
    elif mode == 2:
        norm = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    else:
        norm = (np.abs(x) ** mode).sum(axis=-1, keepdims=True) ** (1.0 / mode)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(norm > 0, x / norm, 0.0)
    return out.astype(np.float32)
