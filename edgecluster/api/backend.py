"""The seam between the HTTP API and whatever generates tokens.

The API knows text, JSON and HTTP; the backend knows token ids. The coordinator's
distributed engine implements `GenerationBackend`; tests use a fake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")


class BackendUnavailable(Exception):
    """The backend cannot serve now (agents lost, re-planning, not enough memory).

    The API answers 503 with this message.
    """


class GenerationBackend(Protocol):
    @property
    def model_name(self) -> str: ...

    @property
    def context_length(self) -> int: ...

    @property
    def eos_token_ids(self) -> Sequence[int]: ...

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

        Raises BackendUnavailable (before or during) when the cluster cannot serve.
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
