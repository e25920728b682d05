"""The only package that imports llama_cpp. Import ``Engine`` from ``llmserve.engine.engine``
lazily: the server and tests use ``llmserve.engine.types`` without loading llama.cpp."""
