"""Random LoRA adapters for a llama-architecture base GGUF, written with the ``gguf`` package.

No LoRA GGUF ships on PyPI, so the tests make their own: ``attn_q`` and ``attn_v`` of every
block get a random low-rank delta large enough to move SmolLM2's greedy picks at scale 1
(llama.cpp applies ``scale * alpha / rank * B @ A``). llama.cpp's adapter layout: per target
weight ``W`` (n_out, n_in) two tensors ``<name>.lora_a`` of numpy shape (rank, n_in) and
``<name>.lora_b`` (n_out, rank); ``general.type = adapter``, ``adapter.type = lora``.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def _field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def write_lora(
    base: Path, out: Path, *, dtype: type[np.floating] = np.float16, rank: int = 8,
    seed: int = 0, std: float = 0.08, architecture: str | None = None,
) -> Path:
    """Write a random adapter for ``base`` to ``out``; ``architecture`` overrides the base's
    (an adapter for another model family)."""
    reader = gguf.GGUFReader(str(base))
    arch = str(_field(reader, "general.architecture"))
    n_embd = int(_field(reader, f"{arch}.embedding_length"))  # type: ignore[call-overload]
    n_layer = int(_field(reader, f"{arch}.block_count"))  # type: ignore[call-overload]
    n_head = int(_field(reader, f"{arch}.attention.head_count"))  # type: ignore[call-overload]
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv"))  # type: ignore[call-overload]
    n_kv = n_embd // n_head * n_head_kv
    del reader
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(out), architecture or arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for layer in range(n_layer):
        for name, n_out in (("attn_q", n_embd), ("attn_v", n_kv)):
            a = rng.normal(0.0, std, size=(rank, n_embd)).astype(dtype)
            b = rng.normal(0.0, std, size=(n_out, rank)).astype(dtype)
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_a", a)
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
