"""Tokenizer and chat template of a checkpoint (transformers' reader), coordinator only.

What a client's input can make fail (text for a model without a tokenizer, a
conversation the chat template refuses) raises ValueError, which the API answers 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import AutoTokenizer, GenerationConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class ChatTokenizer:
    """Text <-> ids. A checkpoint without tokenizer files takes token-id prompts only."""

    def __init__(self, model_dir: Path) -> None:
        has_files = any((model_dir / f).exists() for f in _TOKENIZER_FILES)
        self._tok = AutoTokenizer.from_pretrained(str(model_dir)) if has_files else None
        eos: set[int] = set()
        if self._tok is not None and self._tok.eos_token_id is not None:
            eos.add(int(self._tok.eos_token_id))
        try:
            gen_eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
        except (OSError, ValueError):
            gen_eos = None
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif gen_eos:
            eos.update(int(e) for e in gen_eos)
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(eos))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def _require(self) -> Any:
        if self._tok is None:
            raise ValueError("this model has no tokenizer: send `prompt` as a list of token ids")
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._require().encode(text, add_special_tokens=True))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.has_chat_template:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            return self.encode(text)
        tok = self._require()
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:  # templates refuse some conversations (role order)
            raise ValueError(f"the model's chat template refused these messages: {exc}") from exc
        return list(tok.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        if self._tok is None:
            return " ".join(str(t) for t in token_ids)
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))
