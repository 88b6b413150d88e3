"""The seam between the HTTP API and whatever generates tokens.

The API knows text, JSON and HTTP; the backend knows token ids. The coordinator's
distributed engine implements `GenerationBackend`; tests use a fake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from edgecluster.engine.sampling import SamplingParams

__all__ = [
    "BackendBusy",
    "BackendUnavailable",
    "ControlView",
    "GenerationBackend",
    "SamplingParams",
]


class BackendUnavailable(Exception):
    """The backend cannot serve now (agents lost, re-planning, not enough memory).

    The API answers 503 with this message.
    """


class BackendBusy(Exception):
    """The backend is up but cannot take this request now (queue full, KV memory reserved
    by requests in flight). The API answers 429 with `Retry-After: retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationBackend(Protocol):
    @property
    def model_name(self) -> str: ...

    @property
    def context_length(self) -> int: ...

    @property
    def eos_token_ids(self) -> Sequence[int]: ...

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding: prompt token ids must be below it (the API checks)."""
        ...

    def state(self) -> str:
        """'ready', or what it is doing: 'waiting for agents', 'distributing shards', ..."""
        ...

    def cluster_view(self) -> dict[str, Any]:
        """Members plus, per agent, its shard; what GET /v1/cluster returns."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat template applied to messages, ready for the reply."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        """Yields new token ids; stops at max_tokens or an EOS token (which is yielded).

        Raises BackendUnavailable (before or during) when the cluster cannot serve, and
        BackendBusy (before the first token) when its wait queue is full.
        Closing the iterator early (client gone, stop string hit) cancels the request.
        """
        ...


class ControlView(Protocol):
    """The control plane as the HTTP API sees it, with or without a model.

    With `--model none` the coordinator serves only this: membership and health.
    """

    def cluster_view(self) -> dict[str, Any]:
        """Members and their profiles; GET /v1/cluster when no backend is loaded."""
        ...

    def state(self) -> str:
        """What the control plane is doing: 'ready', 'waiting for agents (1/3 alive)', ..."""
        ...
