"""Turning a token-by-token byte stream into safe text deltas, honouring stop sequences.

Backends hand out bytes per token; a UTF-8 character can span tokens, and a stop sequence
can span deltas. This module holds back exactly as much text as could still turn out to be
part of a character or of a stop sequence, so a streamed response never shows a broken
character or the beginning of a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StopTextBuffer:
    """Feed token bytes in, get text that is safe to emit out.

    After `feed` reports a stop, the generation is over: the stop sequence and anything
    after it are dropped, as the OpenAI API does.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = tuple(s for s in stop if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded but not yet emitted
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; return the text that can be emitted now."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            text, self._pending = self._pending[:cut], ""
            return text
        keep = self._partial_stop_suffix()
        text = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return text

    def flush(self) -> str:
        """The held-back tail, once generation ended for another reason than a stop."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return text

    def _first_stop(self) -> int | None:
        found = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the pending text that begins some stop sequence."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest
