"""OpenAI response bodies: completions, streaming chunks, usage.

Shapes follow the OpenAI API exactly so that its official clients parse them:
`chat.completion`, `chat.completion.chunk` (first chunk carries the role) and
`text_completion` (also the object of completion stream chunks).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _new_id(kind: Literal["chat", "completion"]) -> str:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(frozen=True, kw_only=True)
class ResponseShaper:
    """Builds every body of one request; id and created are shared by all its chunks."""

    kind: Literal["chat", "completion"]
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", _new_id(self.kind))

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def completion(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        """The whole answer of a non-streaming request."""
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            obj = "chat.completion"
        else:
            choice["text"] = text
            obj = "text_completion"
        choice.update(logprobs=None, finish_reason=finish_reason)
        body = self._envelope(obj, [choice])
        body["usage"] = usage.as_dict()
        return body

    def chunk(
        self, text: str, *, finish_reason: str | None = None, first: bool = False
    ) -> dict[str, Any]:
        """One stream chunk; `first` adds the assistant role to a chat delta."""
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            delta: dict[str, str] = {"role": "assistant"} if first else {}
            if text or first:
                delta["content"] = text
            choice["delta"] = delta
            obj = "chat.completion.chunk"
        else:
            choice["text"] = text
            obj = "text_completion"
        choice.update(logprobs=None, finish_reason=finish_reason)
        body = self._envelope(obj, [choice])
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage: no choices, only usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = self._envelope(obj, [])
        body["usage"] = usage.as_dict()
        return body
