"""Units shared by the configuration and the wire models (keep-alive durations, network
endpoints). A neutral
module so that ``protocol/`` needs nothing from ``config``."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator


def parse_duration(value: object) -> float | None:
    """Seconds from a keep-alive value: a number of seconds or a string like "90", "30s", "5m",
    "1h30m". Negative means forever (None); 0 means unload as soon as the model is idle."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected a duration like 300, \"5m\" or -1, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            m = _DURATION.fullmatch(text)
            if m is None or not text:
                raise ValueError(
                    f"expected a duration like 300, \"5m\", \"1h30m\" or -1, got {value!r}"
                ) from None
            sign = -1.0 if text.startswith("-") else 1.0
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    else:
        raise ValueError(f"expected a duration like 300, \"5m\" or -1, got {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"expected a finite duration, got {value!r}")
    return None if seconds < 0 else seconds


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(r"-?(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")

# None stays None (forever): TOML has no null, so only our own code passes it.
Duration = Annotated[
    float | None, BeforeValidator(lambda v: None if v is None else parse_duration(v))
]


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``); raises ValueError naming what is wrong."""
    host, sep, port = endpoint.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"RPC server {endpoint!r} is not HOST:PORT (e.g. 192.168.1.20:50052)")
    return host.strip("[]"), int(port)
