"""llmserve: a local LLM server that turns a GGUF file into an OpenAI-compatible endpoint."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
