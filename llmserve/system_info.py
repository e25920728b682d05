"""GET /system/info's facts about the machine: OS, CPU, RAM, NVIDIA GPUs (NVML or nvidia-smi
when present; nothing when absent, never an error) and versions. llama.cpp's own build facts
come from ``llmserve.engine.model.build_info``."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from llmserve import __version__


def machine_info() -> dict[str, Any]:
    return {
        "os": {"system": platform.system(), "release": platform.release(),
               "version": platform.version(), "machine": platform.machine()},
        "python": platform.python_version(),
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count(),
                "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count()},
        "ram": _ram(),
        "gpus": nvidia_gpus(),
        "versions": {"llmserve": __version__, "llama_cpp_python": _version("llama_cpp_python")},
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram() -> dict[str, int | None]:
    fields: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[name] = int(parts[0]) * 1024
    except OSError:
        pass
    total = fields.get("MemTotal")
    if total is None and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = None
    return {"total_bytes": total, "available_bytes": fields.get("MemAvailable")}


def nvidia_gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs with total and free memory, through NVML (nvidia-ml-py) when installed, else
    nvidia-smi when on PATH; [] when neither answers."""
    try:
        return _nvml_gpus()
    except Exception:  # no pynvml, no driver, no GPU: try the next source
        pass
    try:
        return _smi_gpus()
    except (OSError, ValueError, subprocess.SubprocessError):
        return []


def _nvml_gpus() -> list[dict[str, Any]]:
    import pynvml

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            out.append(_gpu(i, name.decode() if isinstance(name, bytes) else name,
                            int(mem.total), int(mem.free),
                            driver.decode() if isinstance(driver, bytes) else driver, "nvml"))
        return out
    finally:
        pynvml.nvmlShutdown()


def _smi_gpus() -> list[dict[str, Any]]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    run = subprocess.run(
        [smi, "--query-gpu=index,name,memory.total,memory.free,driver_version",
         "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=5, check=True,
    )
    return parse_smi_csv(run.stdout)


def parse_smi_csv(text: str) -> list[dict[str, Any]]:
    """Rows of ``index, name, memory.total [MiB], memory.free [MiB], driver_version``."""
    out = []
    for line in text.strip().splitlines():
        index, name, total, free, driver = (c.strip() for c in line.split(","))
        out.append(_gpu(int(index), name, int(float(total)) * 2**20,
                        int(float(free)) * 2**20, driver, "nvidia-smi"))
    return out


def _gpu(index: int, name: str, total: int, free: int, driver: str,
         source: str) -> dict[str, Any]:
    return {"index": index, "name": name, "memory_total_bytes": total,
            "memory_free_bytes": free, "driver": driver, "source": source}
