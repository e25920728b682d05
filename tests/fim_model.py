"""A fill-in-the-middle-capable copy of the demo model, for the real tier.

SmolLM2's vocabulary has no FIM tokens. The copy is the same GGUF (same weights, same
vocabulary) whose metadata points tokenizer.ggml.fim_pre/suf/mid_token_id at three of its unused
special tokens, so llama.cpp's llama_vocab_fim_pre/suf/mid return them. The model was never
trained on them, so what it writes in the middle is nonsense; the mechanics (the prompt layout,
the route, the 400 without them) are real.
"""

from __future__ import annotations

from pathlib import Path

import gguf

# <jupyter_start>, <jupyter_text>, <jupyter_code>: control tokens the chat model never uses
FIM_IDS = {
    gguf.Keys.Tokenizer.FIM_PRE_ID: 11,
    gguf.Keys.Tokenizer.FIM_SUF_ID: 12,
    gguf.Keys.Tokenizer.FIM_MID_ID: 13,
}


def write_fim_copy(source: Path, dest: Path) -> Path:
    """Copy ``source`` to ``dest`` with FIM_IDS added to its metadata."""
    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None
    writer = gguf.GGUFWriter(dest, arch.contents())
    for field in reader.fields.values():
        # the header's virtual fields and the architecture are written by GGUFWriter itself
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for key, token in FIM_IDS.items():
        writer.add_key_value(key, token, gguf.GGUFValueType.UINT32)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype,
                               tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return dest
