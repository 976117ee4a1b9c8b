"""The text one request streams: incremental detokenization, then its stop strings, if it has any.

Stop strings are checked here, where the text is produced (as vLLM's detokenizer and SGLang's do): the text
that could still be the start of a stop string is held back, and a match ends the request (the caller then
ends it in the engine, worker/engine.py AsyncEngine.end_early).
"""

from __future__ import annotations

from typing import Sequence

from worker.detokenizer import IncrementalDetokenizer
from worker.stop_strings import StopStrings


class OutputText:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_strings = StopStrings(stop) if stop else None

    def push(self, token_ids: list[int], final: bool) -> tuple[str, str | None]:
        """New tokens in; (text to send now, the stop string matched or None) out. `final`: the engine has
        finished the request, so everything still held back is released (unless it holds a match)."""
        text = self.detokenizer.push(token_ids)
        if final:
            text += self.detokenizer.flush()
        if self.stop_strings is None:
            return text, None
        return self.stop_strings.push(text, final)
