"""Random ids for requests and responses (``chatcmpl-…``, ``X-Request-ID``).

They only need to be unique, not secret, so they come from ``random`` (seeded once from the OS)
rather than ``uuid.uuid4``: each uuid4 reads os.urandom, which took ~0.5 ms per call on a
virtual machine measured here — two per request, on every request's path.
"""

from __future__ import annotations

import random

_random = random.Random()


def random_hex(n_chars: int = 32) -> str:
    return f"{_random.getrandbits(4 * n_chars):0{n_chars}x}"


def object_id(prefix: str) -> str:
    """A stored object's id as OpenAI spells them: ``resp_…``, ``msg_…``, ``batch_…``
    (files: ``file-…``, which ``prefix`` "file-" gives with no underscore)."""
    sep = "" if prefix.endswith("-") else "_"
    return f"{prefix}{sep}{random_hex(32)}"
