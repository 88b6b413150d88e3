"""One request's generation: backend token ids in, safe text deltas out.

`TextGeneration.deltas()` drives `backend.generate`, yields one text delta per
generated token ("" while text is held back), and decides the finish reason:
an EOS token ends with "stop" and its text is not emitted; a stop string ends
with "stop", the text cut before it; reaching max_tokens ends with "length".
Closing the delta iterator early (client gone) closes the backend iterator,
which cancels the request. BackendUnavailable from the backend propagates.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from edgecluster.api.backend import GenerationBackend, SamplingParams
from edgecluster.api.detokenize import IncrementalDetokenizer, StopScanner


async def _close(iterator: AsyncIterator[int]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class TextGeneration:
    """Generates for one prompt; read `finish_reason` and `completion_tokens` after."""

    def __init__(
        self,
        backend: GenerationBackend,
        prompt_ids: list[int],
        params: SamplingParams,
        stop: Sequence[str] = (),
    ) -> None:
        self._backend = backend
        self._prompt_ids = prompt_ids
        self._params = params
        self._eos = frozenset(backend.eos_token_ids)
        self._detokenizer = IncrementalDetokenizer(backend.decode, prompt_ids)
        self._stops = StopScanner(stop)
        self._text = ""  # everything decoded so far
        self._emitted = 0  # len of the prefix of _text already yielded
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self._prompt_ids)

    async def deltas(self) -> AsyncGenerator[str, None]:
        """One delta per generated token; the last one flushes held-back text."""
        tokens = self._backend.generate(self._prompt_ids, self._params)
        eos = False
        try:
            async for token_id in tokens:
                self.completion_tokens += 1
                if token_id in self._eos:
                    eos = True
                    break
                yield self._on_text(self._detokenizer.add(token_id))
                if self.finish_reason is not None:  # a stop string
                    return
            tail = self._on_text(self._detokenizer.flush(), final=True)
            if self.finish_reason is None:
                at_limit = self.completion_tokens >= self._params.max_tokens
                self.finish_reason = "length" if at_limit and not eos else "stop"
            yield tail
        finally:
            await _close(tokens)

    def _on_text(self, new_text: str, *, final: bool = False) -> str:
        """Appends decoded text; returns what may be sent now (sets finish on a stop)."""
        self._text += new_text
        cut = self._stops.find(self._text, self._emitted)
        if cut is not None:
            self.finish_reason = "stop"
            end = cut
        elif final:
            end = len(self._text)
        else:
            end = len(self._text) - self._stops.holdback(self._text)
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta
