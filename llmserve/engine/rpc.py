"""llama.cpp's RPC backend: a model's layers on other machines' devices, and the server side.

``--rpc HOST:PORT,...`` registers each server's devices with ggml (what llama-server's ``--rpc``
does) and hands llama.cpp an explicit device list per model, so that only the models configured
with RPC servers use them. ``llmserve rpc-server`` runs llama.cpp's own RPC server
(``ggml_backend_rpc_start_server``, the function its ``rpc-server`` tool calls) with this build's
devices. llama-cpp-python binds none of this: it goes through libggml with ctypes.

llama.cpp cannot survive losing an RPC server: the next message to it ends in GGML_ABORT, which
calls abort() and takes the whole process down. ``guard_aborts`` installs ggml's abort callback
so that an abort on a thread that is not the main one (an engine worker, or ggml-rpc's own
dispatcher thread) instead marks the engines it belongs to as lost, and parks that thread for
good: the server keeps answering (/health 503 with the reason) instead of vanishing. A lost
engine's context cannot be freed or reused, and neither can the connection to that server, so
the endpoint is refused until llmserve restarts.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp

from llmserve.errors import ModelLoadError
from llmserve.units import parse_endpoint

log = logging.getLogger("llmserve.engine")

CONNECT_TIMEOUT_S = 3.0
REBUILD_HINT = ('this llama-cpp-python was built without RPC support; rebuild it with '
                'CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir '
                'llama-cpp-python')

_DEVICE_TYPE_GPU = 1
_DEVICE_TYPE_IGPU = 2

_void_p = ctypes.c_void_p
_SIGNATURES: list[tuple[str, object, list[object]]] = [
    ("ggml_backend_reg_by_name", _void_p, [ctypes.c_char_p]),
    ("ggml_backend_reg_get_proc_address", _void_p, [_void_p, ctypes.c_char_p]),
    ("ggml_backend_register", None, [_void_p]),
    ("ggml_backend_reg_name", ctypes.c_char_p, [_void_p]),
    ("ggml_backend_reg_dev_count", ctypes.c_size_t, [_void_p]),
    ("ggml_backend_reg_dev_get", _void_p, [_void_p, ctypes.c_size_t]),
    ("ggml_backend_dev_count", ctypes.c_size_t, []),
    ("ggml_backend_dev_get", _void_p, [ctypes.c_size_t]),
    ("ggml_backend_dev_by_name", _void_p, [ctypes.c_char_p]),
    ("ggml_backend_dev_by_type", _void_p, [ctypes.c_int]),
    ("ggml_backend_dev_type", ctypes.c_int, [_void_p]),
    ("ggml_backend_dev_name", ctypes.c_char_p, [_void_p]),
    ("ggml_backend_dev_backend_reg", _void_p, [_void_p]),
]
_ADD_SERVER = ctypes.CFUNCTYPE(_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                 ctypes.c_size_t, ctypes.POINTER(_void_p))
_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


def _lib_dir() -> Path:
    return Path(llama_cpp.__file__).parent / "lib"


def open_library(stem: str) -> ctypes.CDLL:
    """The copy of lib``stem`` that llama.cpp itself runs on. The wheel ships each library under
    several names (libggml.so, libggml.so.0, …) as separate files, and each file opened is a
    separate copy with its own globals (ggml's backend registry, its abort callback): opening
    the wrong one would set them where llama.cpp never looks."""
    candidates = [Path(p) for p in _mapped(f"lib{stem}.so")]
    candidates += [_lib_dir() / f"lib{stem}.so.0", _lib_dir() / f"lib{stem}.so",
                   _lib_dir() / f"lib{stem}.dylib", _lib_dir() / f"{stem}.dll"]
    for path in candidates:
        if path.exists():
            return ctypes.CDLL(str(path))
    raise OSError(f"{stem} not found in {_lib_dir()}")


def _mapped(name: str) -> list[str]:
    """Paths of the loaded libraries called ``name`` or ``name.N…`` (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split() for line in maps]
    except OSError:
        return []
    paths = {f[5] for f in fields if len(f) >= 6}
    return sorted(p for p in paths
                  if Path(p).name == name or Path(p).name.startswith(name + "."))


_ggml: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _ggml
    if _ggml is None:
        lib = open_library("ggml")
        for fn, res, args in _SIGNATURES:
            getattr(lib, fn).restype = res
            getattr(lib, fn).argtypes = args
        _ggml = lib
    return _ggml


def supported() -> bool:
    return bool(llama_cpp.llama_supports_rpc())


def _rpc_function(name: str, kind: Any) -> Any:
    if not supported():
        raise ModelLoadError(REBUILD_HINT, param="rpc")
    lib = _lib()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    address = lib.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not address:
        raise ModelLoadError(f"this llama.cpp's RPC backend has no {name}", param="rpc")
    return kind(address)


# endpoint -> its devices, once registered (ggml keeps one connection per endpoint for good)
_servers: dict[str, list[int]] = {}
_lost: dict[str, str] = {}
_lock = threading.Lock()


def lost_endpoints() -> set[str]:
    with _lock:
        return set(_lost)


def _accepts(endpoint: str) -> bool:
    try:
        _reachable(endpoint)
    except ModelLoadError:
        return False
    return True


def _reachable(endpoint: str) -> None:
    """A TCP connect first: ggml aborts the process when it cannot connect."""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ModelLoadError(
            f"cannot reach the RPC server {endpoint} ({exc.strerror or exc}); start llama.cpp's "
            f"rpc-server (or `llmserve rpc-server`) there first", param="rpc") from exc


def connect(endpoints: Sequence[str]) -> list[int]:
    """Register ``endpoints`` with ggml (each once per process) and return their devices, in
    order. Raises ModelLoadError: no RPC in this build, unreachable, lost earlier."""
    devices: list[int] = []
    with _lock:
        for endpoint in endpoints:
            if endpoint in _lost:
                raise ModelLoadError(
                    f"the RPC server {endpoint} was lost earlier ({_lost[endpoint]}); llama.cpp "
                    "cannot reconnect to it: restart llmserve", param="rpc")
            if endpoint not in _servers:
                add_server = _rpc_function("ggml_backend_rpc_add_server", _ADD_SERVER)
                _reachable(endpoint)
                reg = add_server(endpoint.encode())
                if not reg:
                    raise ModelLoadError(f"the RPC server {endpoint} offers no devices",
                                         param="rpc")
                lib = _lib()
                lib.ggml_backend_register(reg)
                _servers[endpoint] = [lib.ggml_backend_reg_dev_get(reg, i)
                                      for i in range(lib.ggml_backend_reg_dev_count(reg))]
            devices.extend(_servers[endpoint])
    return devices


def local_accelerators() -> list[int]:
    """This machine's GPUs (integrated ones only when there is no discrete one), as llama.cpp
    picks them by default."""
    lib = _lib()
    gpus: list[int] = []
    igpus: list[int] = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        reg_name = lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)) or b""
        if reg_name.startswith(b"RPC"):
            continue
        if kind == _DEVICE_TYPE_GPU:
            gpus.append(dev)
        elif kind == _DEVICE_TYPE_IGPU:
            igpus.append(dev)
    return gpus or igpus


def model_devices(endpoints: Sequence[str]) -> ctypes.Array[ctypes.c_void_p] | None:
    """The NULL-terminated device list for llama_model_params.devices: the model's RPC servers
    first (as llama.cpp orders them, to keep transfers down), then the local GPUs. None (llama.cpp's
    default: every device) while no RPC server is registered in this process, so that models
    without ``--rpc`` never spread onto another model's servers."""
    if not endpoints and not _servers:
        return None
    devices = connect(endpoints) + local_accelerators() if endpoints else local_accelerators()
    return (ctypes.c_void_p * (len(devices) + 1))(*devices, None)


def endpoint_of_device(name: str) -> str | None:
    """The endpoint whose devices include ggml device ``name`` ("RPC0")."""
    lib = _lib()
    for endpoint, devices in _servers.items():
        if any(lib.ggml_backend_dev_name(d).decode() == name for d in devices):
            return endpoint
    return None


def serve(host: str, port: int, *, devices: Sequence[str] = (), threads: int = 0,
          cache_dir: str | None = None) -> None:
    """Run llama.cpp's RPC server on ``host:port`` until the process ends (blocking)."""
    start = _rpc_function("ggml_backend_rpc_start_server", _START_SERVER)
    lib = _lib()
    chosen: list[int] = []
    for name in devices:
        dev = lib.ggml_backend_dev_by_name(name.encode())
        if not dev:
            raise ModelLoadError(f"unknown device {name!r}", param="device")
        chosen.append(dev)
    if not chosen:
        chosen = local_accelerators() or [lib.ggml_backend_dev_by_type(0)]  # else the CPU
    array = (ctypes.c_void_p * len(chosen))(*chosen)
    start(f"{host}:{port}".encode(), cache_dir.encode() if cache_dir else None, threads,
          len(chosen), array)


# -- surviving an abort ------------------------------------------------------------------------

Listener = Callable[[str, threading.Thread], None]
_listeners: list[Listener] = []
_callback: object = None  # the ctypes thunk, kept alive


def add_abort_listener(listener: Listener) -> None:
    with _lock:
        _listeners.append(listener)


def remove_abort_listener(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


def _on_abort(raw: bytes | None) -> None:
    message = (raw or b"").decode("utf-8", errors="replace").strip()
    thread = threading.current_thread()
    log.critical("llama.cpp aborted on thread %s: %s", thread.name, message)
    if thread is threading.main_thread():
        return  # nothing to keep alive: abort() as llama.cpp intends
    if "RPC" in message:
        # ggml does not say which server: the ones that no longer accept a connection (all of
        # them when each still does: a malformed answer)
        with _lock:
            endpoints = list(_servers)
        gone = [e for e in endpoints if not _accepts(e)] or endpoints
        with _lock:
            for endpoint in gone:
                _lost.setdefault(endpoint, message.rpartition(": ")[2] or message)
    for listener in list(_listeners):
        try:
            listener(message, thread)
        except Exception:  # a listener must not turn this into a crash after all
            log.exception("abort listener failed")
    threading.Event().wait()  # park: returning would abort() the process


def guard_aborts() -> None:
    """Install the abort callback (once; idempotent)."""
    global _callback
    with _lock:
        if _callback is not None:
            return
        callback = _ABORT_CALLBACK(_on_abort)
        try:
            base = open_library("ggml-base")
            base.ggml_set_abort_callback.restype = _void_p
            base.ggml_set_abort_callback.argtypes = [_ABORT_CALLBACK]
            base.ggml_set_abort_callback(callback)
        except (OSError, AttributeError):
            log.warning("ggml_set_abort_callback unavailable: a lost RPC server ends the process")
            return
        _callback = callback
