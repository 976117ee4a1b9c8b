"""Stop strings over streamed text (pure): what may be sent now, and whether a stop string has appeared.

As vLLM's and SGLang's detokenizers do, the check runs on the text as it is produced, and the last
len(longest stop) - 1 characters are held back: they could be the start of a stop string that the next
tokens complete, and a match must never be streamed. A stop string split across tokens, or across the
pieces pushed here, is therefore found. Any match lies within the held-back tail plus the new text (a match
starting earlier would have ended inside text already seen, and been found then), so each push searches only
that window.

On a match the text is cut before it: what precedes it is sent, the match and everything after are not.
When several stop strings occur, the earliest wins; at the same position, the first in the request's list.
"""

from __future__ import annotations

from typing import Sequence


class StopStrings:
    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.hold = max(len(s) for s in self.stop) - 1
        self._pending = ""   # text seen but not yet released

    def push(self, text: str, final: bool = False) -> tuple[str, str | None]:
        """Adds newly produced text; returns (text to send now, the stop string matched or None). After a match
        the stream is over. `final`: no more text will come, so nothing needs holding back."""
        pending = self._pending + text
        at, matched = len(pending), None
        for s in self.stop:
            i = pending.find(s, 0, at + len(s) - 1)   # only a match that starts before the best so far
            if i != -1 and i < at:
                at, matched = i, s
        if matched is not None:
            self._pending = ""
            return pending[:at], matched
        if final or self.hold == 0:
            self._pending = ""
            return pending, None
        cut = max(0, len(pending) - self.hold)
        self._pending = pending[cut:]
        return pending[:cut], None
