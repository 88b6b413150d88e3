"""Training data: corpus files -> token ids -> deterministic micro-batches.

- `load_texts(paths)`: `.jsonl` / `.json` files give the "text" field of each line's
  object; any other file is one text (UTF-8).
- `tokenizer_for(model_dir, cfg)`: the checkpoint's Hugging Face tokenizer, or a
  byte-level `ByteTokenizer` (vocabulary 256, as nanoGPT's shakespeare-char is
  character-level) when training from a bare `config.json`.
- `prepare_tokens(texts, tokenizer)`: one token stream (texts joined by EOS, or "\\n"
  for bytes), its last fraction held out for evaluation.
- `BatchSampler.batch(index)`: [B, seq_len + 1] random windows drawn from
  (seed, index) alone, so the position to resume from is one integer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from edgecluster.model_config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
JSON_LINES_SUFFIXES = (".jsonl", ".json")


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def join_ids(self) -> list[int]:
        """Token ids placed between two texts of the corpus."""
        ...


def load_texts(paths: Sequence[Path | str]) -> list[str]:
    """The texts of the corpus files, in order; ValueError naming a bad file or line."""
    texts: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise ValueError(f"data file {path} does not exist (or is not a file)")
        if path.suffix.lower() in JSON_LINES_SUFFIXES:
            texts.extend(_json_lines(path))
        else:
            texts.append(_read_utf8(path))
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(
            f"the corpus {', '.join(str(p) for p in paths) or '(no files)'} holds no text; "
            'give plain-text files or JSON lines with a non-empty "text" field'
        )
    return texts


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc}); convert it to UTF-8") from exc


def _json_lines(path: Path) -> list[str]:
    texts: list[str] = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not JSON ({exc.msg})") from exc
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ValueError(
                f'{path}:{number} has no string "text" field; each line of a JSON-lines '
                'corpus must be an object like {"text": "..."}'
            )
        texts.append(text)
    return texts


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256); texts are joined by a newline."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def join_ids(self) -> list[int]:
        return [ord("\n")]


class HFTokenizer:
    """A checkpoint's transformers tokenizer; texts are joined by its EOS token."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(
                f"the tokenizer in {model_dir} has no EOS token to separate texts with"
            )
        self._eos = int(eos)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once (the fast tokenizer runs them in parallel)."""
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def join_ids(self) -> list[int]:
        return [self._eos]


def tokenizer_for(model_dir: Path | str | None, cfg: ModelConfig) -> Tokenizer:
    """The checkpoint's tokenizer, else bytes (which needs vocab_size >= 256)."""
    if model_dir is not None and any((Path(model_dir) / f).exists() for f in TOKENIZER_FILES):
        tok = HFTokenizer(Path(model_dir))
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"the tokenizer in {model_dir} has {tok.vocab_size} tokens but the model's "
                f"vocab_size is {cfg.vocab_size}; use the model's own tokenizer"
            )
        return tok
    if cfg.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(
            f"there is no tokenizer{f' in {model_dir}' if model_dir else ''} and vocab_size "
            f"{cfg.vocab_size} is below 256, too small for byte-level training; set "
            "vocab_size >= 256 in config.json or give a checkpoint with tokenizer files"
        )
    return ByteTokenizer()


@dataclass(frozen=True, kw_only=True)
class TokenData:
    """The corpus as one int64 token stream, split by position: the tail is held out."""

    train: torch.Tensor  # [N_train] int64
    held_out: torch.Tensor  # [N_held] int64
    held_out_fraction: float

    def __post_init__(self) -> None:
        for name in ("train", "held_out"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or t.dim() != 1:
                raise ValueError(f"TokenData.{name} must be a 1-D int64 tensor")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction {self.held_out_fraction} must be in [0, 1)")

    def description(self) -> str:
        return (
            f"{self.train.numel():,} training tokens; held out: last "
            f"{self.held_out_fraction:.0%} of the tokens ({self.held_out.numel():,} tokens)"
        )


def prepare_tokens(
    texts: Sequence[str], tokenizer: Tokenizer, held_out_fraction: float = 0.05
) -> TokenData:
    """Tokenize and join `texts`; the last `held_out_fraction` of the tokens is held out."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction {held_out_fraction} must be in [0, 1)")
    ids: list[int] = []
    for i, encoded in enumerate(tokenizer.encode_batch(texts)):
        if i:
            ids.extend(tokenizer.join_ids())
        ids.extend(encoded)
    tokens = torch.tensor(ids, dtype=torch.int64)
    held = round(tokens.numel() * held_out_fraction)
    cut = tokens.numel() - held
    return TokenData(
        train=tokens[:cut].clone(),
        held_out=tokens[cut:].clone(),
        held_out_fraction=held_out_fraction,
    )


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T + 1] windows -> (input ids [B, T], targets [B, T])."""
    return batch[:, :-1], batch[:, 1:]


class BatchSampler:
    """Micro-batches of random windows, each a pure function of (seed, index)."""

    def __init__(
        self, tokens: TokenData, *, seq_len: int, micro_batch_size: int, seed: int
    ) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(
                f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be >= 1"
            )
        if tokens.train.numel() < seq_len + 1:
            raise ValueError(
                f"the training corpus has {tokens.train.numel():,} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}; give more data or a shorter --seq-len"
            )
        self.tokens, self.seq_len, self.micro_batch_size = tokens, seq_len, micro_batch_size
        self.seed = seed
        self._offsets = torch.arange(seq_len + 1)

    def batch(self, index: int) -> torch.Tensor:
        """Micro-batch `index`: [B, seq_len + 1] int64 windows of the training tokens."""
        digest = hashlib.sha256(f"{self.seed}:{index}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        high = self.tokens.train.numel() - self.seq_len  # exclusive bound of a start
        starts = torch.randint(0, high, (self.micro_batch_size,), generator=gen)
        return self.tokens.train[starts[:, None] + self._offsets]

    def eval_batches(self, num_batches: int) -> list[torch.Tensor]:
        """`num_batches` fixed [B, seq_len + 1] batches of evenly spaced held-out windows."""
        held = self.tokens.held_out
        if held.numel() < self.seq_len + 1:
            raise ValueError(
                f"the held-out slice has {held.numel():,} tokens, fewer than seq_len + 1 = "
                f"{self.seq_len + 1}; give more data, a larger held-out fraction or a "
                "shorter --seq-len"
            )
        if num_batches < 1:
            return []
        count = num_batches * self.micro_batch_size
        last = held.numel() - self.seq_len - 1
        starts = torch.linspace(0, last, count, dtype=torch.float64).round().to(torch.int64)
        windows = held[starts[:, None] + self._offsets]
        return list(windows.split(self.micro_batch_size))
