"""Tier 1: the GGUF header reader on the demo model, on GGUFs written here, and on broken files."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from llmserve.errors import ModelLoadError
from llmserve.gguf_info import FILE_TYPE_NAMES, TENSOR_TYPES, read_gguf, read_gguf_cached


def _str(s: str) -> bytes:
    data = s.encode()
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, value: Any) -> bytes:
    if isinstance(value, str):
        return _str(key) + struct.pack("<I", 8) + _str(value)
    if isinstance(value, list):
        body = b"".join(_str(v) for v in value)
        return _str(key) + struct.pack("<IIQ", 9, 8, len(value)) + body
    return _str(key) + struct.pack("<IQ", 10, value)  # uint64


def write_gguf(path: Path, metadata: dict[str, Any],
               tensors: list[tuple[str, tuple[int, ...], int]], *, data: bool = True) -> Path:
    """A small valid GGUF v3: ``tensors`` are (name, shape, ggml type) laid out back to back."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    head += b"".join(_kv(k, v) for k, v in metadata.items())
    offset = 0
    sizes = []
    for name, shape, ggml_type in tensors:
        head += _str(name) + struct.pack("<I", len(shape))
        head += b"".join(struct.pack("<Q", d) for d in shape)
        head += struct.pack("<IQ", ggml_type, offset)
        _, block, size = TENSOR_TYPES[ggml_type]
        n = 1
        for d in shape:
            n *= d
        sizes.append(n // block * size)
        offset += -(-sizes[-1] // 32) * 32
    head += b"\0" * (-len(head) % 32)
    path.write_bytes(head + (b"\0" * offset if data else b""))
    return path


LLAMA_META = {"general.architecture": "llama", "general.name": "tiny", "general.file_type": 15,
              "llama.context_length": 2048}


@pytest.mark.real
def test_demo_model(demo_model: Path) -> None:
    info = read_gguf(demo_model)
    assert info.architecture == "llama"
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert info.chat_template is not None and "im_start" in info.chat_template
    assert info.file_size == demo_model.stat().st_size
    # no general.parameter_count in this file: counted from the tensor shapes (llama.cpp's
    # llama_model_n_params says 134515008 for it)
    assert "general.parameter_count" not in info.metadata
    assert info.parameter_count == 134_515_008
    assert info.to_dict()["has_chat_template"] is True


def test_written_gguf_and_counts(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", {**LLAMA_META, "tokenizer.ggml.tokens":
                                               [f"t{i}" for i in range(100)]},
                      [("a", (64, 4), 12), ("b", (32,), 0)])
    info = read_gguf(path)
    assert (info.architecture, info.quantization, info.context_length) == ("llama", "Q4_K_M",
                                                                          2048)
    assert info.parameter_count == 64 * 4 + 32
    assert info.chat_template is None
    assert [t.name for t in info.tensors] == ["a", "b"]


def test_quantization_without_file_type_is_the_common_weight_type(tmp_path: Path) -> None:
    meta = {k: v for k, v in LLAMA_META.items() if k != "general.file_type"}
    path = write_gguf(tmp_path / "x.gguf", meta,
                      [("w1", (32, 2), 8), ("w2", (32, 2), 8), ("norm", (32,), 0)])
    assert read_gguf(path).quantization == "Q8_0"


def test_split_gguf_reads_every_part(tmp_path: Path) -> None:
    one = write_gguf(tmp_path / "big-00001-of-00002.gguf", LLAMA_META, [("a", (32, 2), 0)])
    two = write_gguf(tmp_path / "big-00002-of-00002.gguf", {}, [("b", (32, 4), 0)])
    info = read_gguf(one)
    assert info.split_count == 2
    assert info.parameter_count == 64 + 128
    assert info.file_size == one.stat().st_size + two.stat().st_size
    two.unlink()
    with pytest.raises(ModelLoadError, match=r"00002-of-00002\.gguf is missing"):
        read_gguf(one)


def _cut(source: Path, dest: Path, n: int) -> Path:
    dest.write_bytes(source.read_bytes()[:n])
    return dest


@pytest.mark.real
@pytest.mark.parametrize("cut", [0, 3, 10, 30, 5_000, 1_000_000, 60_000_000],
                         ids=["empty", "in-magic", "in-counts", "in-first-key", "in-metadata",
                              "in-tensor-table-or-data", "in-data"])
def test_truncated_files_are_clear_errors(demo_model: Path, tmp_path: Path, cut: int) -> None:
    path = _cut(demo_model, tmp_path / "cut.gguf", cut)
    with pytest.raises(ModelLoadError) as exc:
        read_gguf(path)
    message = exc.value.message
    assert str(path) in message
    assert "truncated" in message or "not a GGUF" in message


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"hello, I am a text file", "not a GGUF"),
        (b"GGUF" + struct.pack("<I", 1) + b"\0" * 40, "version 1 is not supported"),
        (b"GGUF" + struct.pack("<IQQ", 3, 2**60, 1), "header claims"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40), "claims"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _str("k") + struct.pack("<I", 99),
         "unknown type 99"),
    ],
    ids=["text", "old-version", "absurd-counts", "absurd-string", "unknown-value-type"],
)
def test_garbage_files_are_clear_errors(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=fragment):
        read_gguf(path)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="is a directory"):
        read_gguf(tmp_path)


def test_data_shorter_than_the_tensor_table_says(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "x.gguf", LLAMA_META, [("a", (256, 256), 0)], data=False)
    with pytest.raises(ModelLoadError, match="truncated: its tensors need"):
        read_gguf(path)


def test_cache_notices_a_changed_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "x.gguf", LLAMA_META, [("a", (32,), 0)])
    assert read_gguf_cached(path).parameter_count == 32
    write_gguf(path, LLAMA_META, [("a", (32, 3), 0)])
    assert read_gguf_cached(path).parameter_count == 96


@pytest.mark.real
def test_type_tables_match_llama_cpp() -> None:
    import llama_cpp

    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_") and name != "LLAMA_FTYPE_GUESSED":
            short = name.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_ALL_")
            assert FILE_TYPE_NAMES[getattr(llama_cpp, name)] == short
        if name.startswith("GGML_TYPE_") and getattr(llama_cpp, name) in TENSOR_TYPES:
            assert TENSOR_TYPES[getattr(llama_cpp, name)][0] == name.removeprefix("GGML_TYPE_")
