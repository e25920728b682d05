"""What a GGUF file is, read from its header without loading the weights.

A small reader of our own rather than the ``gguf`` package: we need the key-value section and
the tensor table only, and a truncated or corrupt file must become one clear ``ModelLoadError``
(the ``gguf`` package memory-maps the whole file and fails on truncation with numpy errors).
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md

Reading is bounded: every length is checked against the bytes left in the file before it is
read, so a garbage header cannot make us allocate or loop without end.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmserve.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SPLIT_PATTERN = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})$")

# llama.cpp's llama_ftype (general.file_type) → the name users know from file names.
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}

# ggml tensor types: name, elements per block, bytes per block (ggml.c type_traits).
TENSOR_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# GGUF value types → struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this (token lists, merges) are summarised, not kept.
_KEEP_ARRAY = 64
_MAX_STRING = 16 * 1024 * 1024


@dataclass(frozen=True)
class ArraySummary:
    item_type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int | None:
        traits = TENSOR_TYPES.get(self.type)
        if traits is None:
            return None
        _, block, size = traits
        return self.n_elements // block * size


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    files: tuple[Path, ...]
    file_size: int
    version: int
    metadata: dict[str, Any] = field(repr=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def name(self) -> str | None:
        value = self.metadata.get("general.name")
        return value if isinstance(value, str) else None

    @property
    def parameter_count(self) -> int:
        value = self.metadata.get("general.parameter_count")
        if isinstance(value, int) and value > 0:
            return value
        return sum(t.n_elements for t in self.tensors)

    @property
    def file_type(self) -> int | None:
        value = self.metadata.get("general.file_type")
        return value if isinstance(value, int) else None

    @property
    def quantization(self) -> str:
        if self.file_type is not None:
            return FILE_TYPE_NAMES.get(self.file_type, f"file_type {self.file_type}")
        # No general.file_type: name the most common type among the weight matrices.
        counts = Counter(t.type for t in self.tensors if len(t.shape) >= 2)
        if not counts:
            return "unknown"
        common = counts.most_common(1)[0][0]
        return TENSOR_TYPES.get(common, (f"type {common}", 0, 0))[0]

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return value if isinstance(value, int) else None

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value else None

    @property
    def split_count(self) -> int:
        return len(self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "file_size": self.file_size,
            "gguf_version": self.version,
            "name": self.name,
            "architecture": self.architecture,
            "parameter_count": self.parameter_count,
            "quantization": self.quantization,
            "file_type": self.file_type,
            "context_length": self.context_length,
            "has_chat_template": self.chat_template is not None,
            "tensor_count": len(self.tensors),
        }


class _Reader:
    """Little- or big-endian reads over a memory map that never run past the end of the file
    (only the pages holding the header are ever touched)."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.path = path
        self.size = len(buf)
        self.pos = 0
        self.order = "<"

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelLoadError(
                f"{self.path} is truncated or corrupt: {what} runs past the end of the file "
                f"(offset {self.pos}, {n} bytes wanted, file is {self.size} bytes)",
                param="model",
            )
        self.pos += n

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.pos
        self.skip(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, start)[0]

    def u32(self, what: str) -> int:
        return int(self.scalar("I", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("Q", what))

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > _MAX_STRING:
            raise ModelLoadError(f"{self.path} is corrupt: {what} claims {n} bytes",
                                 param="model")
        start = self.pos
        self.skip(n, what)
        return self.buf[start:self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], key)
        if vtype == _STRING:
            return self.string(key)
        if vtype == _ARRAY:
            item_type = self.u32(key)
            length = self.u64(key)
            if length > self.size:  # every item takes at least one byte
                raise ModelLoadError(f"{self.path} is corrupt: array {key} claims {length} items",
                                     param="model")
            if length <= _KEEP_ARRAY:
                return [self.value(item_type, key) for _ in range(length)]
            if item_type in _SCALARS:
                self.skip(struct.calcsize(_SCALARS[item_type]) * length, key)
            elif item_type == _STRING:
                for _ in range(length):
                    self.skip(self.u64(key), key)
            else:
                for _ in range(length):
                    self.value(item_type, key)
            return ArraySummary(item_type, length)
        raise ModelLoadError(f"{self.path} is corrupt: metadata {key!r} has unknown type {vtype}",
                             param="model")


def _read_one(path: Path) -> tuple[int, dict[str, Any], list[TensorInfo], int]:
    """(version, metadata, tensors, file size) of one GGUF file; checks the tensor data fits."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4 or f.read(4) != GGUF_MAGIC:
                raise ModelLoadError(
                    f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)",
                    param="model",
                )
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Reader(buf, path))
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}",
                             param="model") from exc


def _parse(r: _Reader) -> tuple[int, dict[str, Any], list[TensorInfo], int]:
    path, size = r.path, r.size
    r.pos = 4
    version = r.u32("the GGUF version")
    if version & 0xFFFF == 0:  # a big-endian file read as little-endian
        r.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise ModelLoadError(
            f"{path}: GGUF version {version} is not supported (expected 2 or 3)", param="model"
        )
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the metadata count")
    if n_tensors > size or n_kv > size:
        raise ModelLoadError(f"{path} is corrupt: its header claims {n_tensors} tensors "
                             f"and {n_kv} metadata entries", param="model")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string("a metadata key")
        metadata[key] = r.value(r.u32(f"the type of {key}"), key)
    tensors: list[TensorInfo] = []
    for _ in range(n_tensors):
        name = r.string("a tensor name")
        n_dims = r.u32(f"tensor {name}")
        if n_dims > 8:
            raise ModelLoadError(f"{path} is corrupt: tensor {name} has {n_dims} dimensions",
                                 param="model")
        shape = tuple(r.u64(f"tensor {name}") for _ in range(n_dims))
        tensors.append(TensorInfo(name, shape, r.u32(f"tensor {name}"), r.u64(f"tensor {name}")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = DEFAULT_ALIGNMENT
    data_start = -(-r.pos // alignment) * alignment
    data_end = data_start
    for t in tensors:
        n_bytes = t.n_bytes
        if n_bytes is not None:
            data_end = max(data_end, data_start + t.offset + n_bytes)
    if data_end > size:
        raise ModelLoadError(
            f"{path} is truncated: its tensors need {data_end} bytes, the file has {size}",
            param="model",
        )
    return version, metadata, tensors, size


def split_parts(path: Path) -> list[Path]:
    """All parts of a split GGUF (``name-00001-of-00003.gguf``) given its first part; else
    ``[path]``."""
    m = SPLIT_PATTERN.match(path.stem)
    if m is None:
        return [path]
    total = int(m["total"])
    return [path.with_name(f"{m['base']}-{i:05d}-of-{total:05d}.gguf")
            for i in range(1, total + 1)]


def read_gguf(path: str | os.PathLike[str]) -> GgufInfo:
    """Read a GGUF's metadata and tensor table (every part of a split model). Raises
    ModelLoadError naming the file and what is wrong with it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}", param="model")
    if p.is_dir():
        raise ModelLoadError(f"{p} is a directory, not a .gguf model file", param="model")
    parts = split_parts(p)
    version, metadata, tensors, total = _read_one(p)
    for part in parts[1:]:
        if not part.is_file():
            raise ModelLoadError(f"{p} is split in {len(parts)} parts but {part.name} is missing",
                                 param="model")
        _, _, more, size = _read_one(part)
        tensors += more
        total += size
    return GgufInfo(path=p, files=tuple(parts), file_size=total, version=version,
                    metadata=metadata, tensors=tuple(tensors))


_cache: dict[tuple[str, int, int], GgufInfo] = {}


def read_gguf_cached(path: str | os.PathLike[str]) -> GgufInfo:
    """``read_gguf``, remembered while the file's size and mtime stay the same (model listings
    read every known file's header)."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        return read_gguf(p)  # raises the clear error
    key = (str(p), st.st_size, st.st_mtime_ns)
    info = _cache.get(key)
    if info is None:
        info = read_gguf(p)
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = info
    return info
