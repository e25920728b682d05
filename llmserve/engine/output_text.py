"""Turn sampled token bytes into text that is safe to show: whole UTF-8 characters only, and no
part of a stop string ever emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class OutputText:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stop_word: str | None = None

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that may be shown now.

        After a stop string appears, ``stop_word`` is set, the text before it is returned, and
        everything after is swallowed.
        """
        if self.stop_word is not None:
            return ""
        self._held += self._decoder.decode(piece)
        if not self._stop:
            out, self._held = self._held, ""
            return out
        first: tuple[int, str] | None = None
        for s in self._stop:
            i = self._held.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self.stop_word = first[1]
            out, self._held = self._held[: first[0]], ""
            return out
        keep = self._partial_stop_suffix()
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out

    def flush(self) -> str:
        """The rest, at the end of generation (held-back text that never became a stop)."""
        if self.stop_word is not None:
            return ""
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return out

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of the held text that could begin a stop string."""
        held = self._held
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(held)), best, -1):
                if held.endswith(s[:n]):
                    best = n
                    break
        return best
