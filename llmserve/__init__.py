"""llmserve: a local LLM server that turns a GGUF file into an OpenAI-compatible endpoint."""

# The one place the version is written (pyproject reads it): importlib.metadata would cost
# `llmserve ask` about 50 ms of start-up on every call.
__version__ = "0.1.0"
