"""``python -m llmserve.engine.lora_probe BASE ADAPTER N_GPU_LAYERS``: the throwaway child of
``lora.prove_adapter``. Loads the base model and the adapter, decodes a few tokens with the
adapter at scale 1 and exits 0; on an error llama.cpp reports, prints one line saying why and
exits 1. If the adapter crashes llama.cpp, this process dies instead of the server."""

from __future__ import annotations

import sys
from pathlib import Path

import llama_cpp

from llmserve.engine.lora import LoraTable
from llmserve.engine.model import LoadedModel
from llmserve.errors import LlmserveError


def main(base: str, adapter: str, n_gpu_layers: str) -> int:
    try:
        model = LoadedModel(base, n_ctx=64, n_batch=64, n_threads=1,
                            n_gpu_layers=int(n_gpu_layers))
        table = LoraTable(model.model)
        loaded = table.load(Path(adapter), 1.0)
        table.apply(model.ctx, ((loaded.id, 1.0),))
        tokens = model.tokenize("Hello, world")
        batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * len(tokens))(*tokens),
                                              len(tokens))
        rc = llama_cpp.llama_decode(model.ctx, batch)
        if rc != 0:
            print(f"the test decode failed (llama_decode code {rc})")
            return 1
    except LlmserveError as exc:
        print(exc.message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
