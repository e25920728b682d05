"""The data directory: one SQLite database (responses, files' metadata, batches) and a folder
of file contents. The only package that touches them (DESIGN.md)."""

from __future__ import annotations

from llmserve.store.database import SCHEMA_VERSION, Store, default_data_dir

__all__ = ["SCHEMA_VERSION", "Store", "default_data_dir"]
