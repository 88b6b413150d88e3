"""Token ids to text, one token at a time, and stop-string matching.

`IncrementalDetokenizer` turns a growing list of generated ids into text deltas
whose concatenation equals decoding the whole list in the prompt's context. A
character split over several tokens (UTF-8 bytes, byte-fallback pieces) decodes
to U+FFFD until its last token arrives, so text ending in U+FFFD is held back.
Decoding uses a short window (the vLLM scheme: a few tokens of context before
the new ones), so the cost per token stays constant however long the reply.

`StopScanner` finds stop strings and says how much of a text's tail might be the
start of one, so a stream never sends text that a later token turns into a stop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded before the reply (leading spaces)


class IncrementalDetokenizer:
    """Feeds generated ids, returns new text; `flush` releases what was held back."""

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._ids = context
        self._prefix_offset = 0  # ids[prefix_offset:read_offset]: context already decoded
        self._read_offset = len(context)  # ids from here on are not yet emitted

    def add(self, token_id: int) -> str:
        """Appends one generated id; returns the text it completes ("" if held back)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character shows as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text):
            return ""
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopScanner:
    """Stop strings of one request."""

    def __init__(self, stops: Sequence[str]) -> None:
        assert all(stops), "stop strings must not be empty"
        self._stops = tuple(stops)

    def find(self, text: str, start: int = 0) -> int | None:
        """Index of the earliest stop string in text[start:], or None."""
        hits = [i for i in (text.find(s, start) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
