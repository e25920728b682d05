"""Starlette HTTP layer. Routes translate protocol ↔ engine; nothing here imports llama_cpp."""
