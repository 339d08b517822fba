"""Turns a stream of token bytes into text a client may see: whole UTF-8 characters, stop strings cut out.

A token can end in the middle of a multi-byte character, and a stop string can span tokens; so the stream holds back
the bytes of an unfinished character and the tail of the text that could still become a stop string.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(stop for stop in stops if stop)
        self._longest_stop = max((len(stop) for stop in self._stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to send (possibly empty).

        After a stop string is seen, `stopped` is True and the text before it is returned; the rest is dropped.
        """
        text = self._held + self._decoder.decode(data)
        if not self._stops:
            self._held = ""
            return text
        cut = self._first_stop(text)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._stop_prefix_length(text)
        if keep:
            self._held = text[-keep:]
            return text[:-keep]
        self._held = ""
        return text

    def finish(self) -> str:
        """The text still held back once generation has ended without a stop string."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _first_stop(self, text: str) -> int:
        # Only the held tail plus the new text can hold a stop string that was not there before.
        best = -1
        for stop in self._stops:
            at = text.find(stop)
            if at >= 0 and (best < 0 or at < best):
                best = at
        return best

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = min(self._longest_stop - 1, len(text))
        for length in range(longest, 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
