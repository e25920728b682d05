"""Tiny random-weight BERT-style GGUFs for the embedding and rerank tests (no embedding or rerank
GGUF ships on PyPI). The smallest tensor and metadata set llama.cpp 0.3.36's ``bert``
architecture accepts (vendor/llama.cpp/src/models/bert.cpp): token, type and position
embeddings, the embedding norm, per layer separate Q/K/V with biases, the attention output and
its norm, the FFN and the layer output norm; a rank head adds ``cls`` and ``cls.output``. The
vocabulary is a WordPiece ("bert") one: four specials, then each letter and a few words as
word starts (``▁`` prefix, how llama.cpp's WPM tokenizer marks them) and as word pieces.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

N_EMBD = 32
N_FF = 64
N_HEAD = 4
N_LAYER = 2
N_CTX_TRAIN = 512
WORDS = ("hello", "world", "cat", "dog", "paris", "france", "capital", "the", "is", "of", "a")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def vocabulary() -> list[str]:
    pieces = list(string.ascii_lowercase) + list(string.digits) + list(".,!?'")
    starts = dict.fromkeys(f"\u2581{w}" for w in (*WORDS, *pieces))
    return [*SPECIALS, *starts, *pieces]


def write_bert(path: Path, *, rank_head: bool = False, seed: int = 0) -> Path:
    """Write the model to ``path``: mean pooling, or with ``rank_head`` rank pooling and a
    classification head (a reranker)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = vocabulary()

    def w(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_name("tiny-bert-reranker" if rank_head else "tiny-bert")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_block_count(N_LAYER)
    writer.add_head_count(N_HEAD)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK if rank_head else gguf.PoolingType.MEAN)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS)
                           + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    writer.add_token_type_count(2)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_sep_token_id(3)

    writer.add_tensor("token_embd.weight", w(len(tokens), N_EMBD, scale=1.0))
    writer.add_tensor("token_types.weight", w(2, N_EMBD))
    writer.add_tensor("position_embd.weight", w(N_CTX_TRAIN, N_EMBD))
    writer.add_tensor("token_embd_norm.weight", ones(N_EMBD))
    writer.add_tensor("token_embd_norm.bias", w(N_EMBD))
    for i in range(N_LAYER):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", w(N_EMBD, N_EMBD))
            writer.add_tensor(f"blk.{i}.{name}.bias", w(N_EMBD))
        for norm in ("attn_output_norm", "layer_output_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", ones(N_EMBD))
            writer.add_tensor(f"blk.{i}.{norm}.bias", w(N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.bias", w(N_FF))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(N_EMBD, N_FF))
        writer.add_tensor(f"blk.{i}.ffn_down.bias", w(N_EMBD))
    if rank_head:
        writer.add_tensor("cls.weight", w(N_EMBD, N_EMBD))
        writer.add_tensor("cls.bias", w(N_EMBD))
        writer.add_tensor("cls.output.weight", w(1, N_EMBD, scale=1.0))
        writer.add_tensor("cls.output.bias", w(1))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
