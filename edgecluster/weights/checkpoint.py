"""Lazy, read-only access to a Hugging Face safetensors checkpoint directory.

A checkpoint directory holds `config.json` and either one or more `*.safetensors`
files or a sharded set listed by `model.safetensors.index.json`. `Checkpoint` never
loads the model whole: every read goes through `safetensors.safe_open(...).get_slice`,
so asking for a few rows of a weight reads those rows and nothing else. The
coordinator slices multi-gigabyte checkpoints for its agents this way.

Names are Hugging Face's (`model.layers.3.self_attn.q_proj.weight`). A tied
checkpoint without `lm_head.weight` answers that name with the embedding.
Pickle checkpoints (`*.bin`, `*.pt`) are refused, never loaded.
"""

from __future__ import annotations

import json
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from edgecluster.model_config import ModelConfig
from edgecluster.weights.safetensors_file import SAFETENSORS_DTYPES, parse_header, read_header_bytes

INDEX_FILE = "model.safetensors.index.json"
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def checkpoint_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, sorted; ValueError if there are none."""
    index = checkpoint_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_index(index)
        return sorted({checkpoint_dir / name for name in weight_map.values()})
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{checkpoint_dir} holds no *.safetensors files; edgecluster reads safetensors "
            "only (never pickle). Convert the checkpoint with transformers: "
            "from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
        )
    return files


class Checkpoint:
    """A checkpoint directory opened for lazy reads. Safe to share between threads."""

    def __init__(self, checkpoint_dir: Path | str) -> None:
        self.path = Path(checkpoint_dir)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"{self.path} is not a checkpoint directory: it has no config.json. "
                "Point at a Hugging Face model directory or a .gguf file"
            )
        self.config: dict[str, Any] = json.loads(config_file.read_text())
        self._files: dict[str, Path] = _tensor_files(self.path)
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()

    @cached_property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf_dict(self.config)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def names(self) -> list[str]:
        """Tensor names stored in the files (without the tied `lm_head` alias)."""
        return sorted(self._files)

    def has(self, name: str) -> bool:
        return self._resolve(name) in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._slice(name).get_dtype()]

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor (read from disk now; the caller owns the memory)."""
        handle, key = self._open(name)
        return handle.get_tensor(key)

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of a 2-D tensor (elements of a 1-D one): [end-start, ...]."""
        shape = self.shape(name)
        _check_range(name, shape, 0, start, end)
        if start == end:
            return torch.empty((0, *shape[1:]), dtype=self.dtype(name))
        return self._slice(name)[start:end]

    def cols(self, name: str, start: int, end: int) -> torch.Tensor:
        """Columns [start, end) of a 2-D tensor: [rows, end-start]."""
        shape = self.shape(name)
        if len(shape) != 2:
            raise ValueError(f"cols() needs a 2-D tensor; {name} has shape {list(shape)}")
        _check_range(name, shape, 1, start, end)
        if start == end:
            return torch.empty((shape[0], 0), dtype=self.dtype(name))
        return self._slice(name)[:, start:end]

    def close(self) -> None:
        """Drop the open file handles (they are reopened on the next read)."""
        with self._lock:
            self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _resolve(self, name: str) -> str:
        if name == LM_HEAD and name not in self._files and self.tied:
            return EMBED
        return name

    def _slice(self, name: str) -> Any:
        handle, key = self._open(name)
        return handle.get_slice(key)

    def _open(self, name: str) -> tuple[Any, str]:
        key = self._resolve(name)
        path = self._files.get(key)
        if path is None:
            raise ValueError(
                f"tensor {name!r} is not in checkpoint {self.path}; the checkpoint is "
                "incomplete or not a Llama-family model"
            )
        with self._lock:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
        return handle, key


def _tensor_files(checkpoint_dir: Path) -> dict[str, Path]:
    index = checkpoint_dir / INDEX_FILE
    if index.is_file():
        return {name: checkpoint_dir / file for name, file in _read_index(index).items()}
    files: dict[str, Path] = {}
    for path in checkpoint_weight_files(checkpoint_dir):
        size = path.stat().st_size
        for entry in parse_header(read_header_bytes(path), size, path):
            files[entry.name] = path
    return files


def _read_index(index: Path) -> dict[str, str]:
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map; the checkpoint is incomplete")
    for file in set(weight_map.values()):
        if "/" in file or "\\" in file or not (index.parent / file).is_file():
            raise ValueError(
                f"{index} lists weight file {file!r}, which is missing; the download is "
                "incomplete: fetch the checkpoint again"
            )
    return weight_map


def _check_range(name: str, shape: tuple[int, ...], dim: int, start: int, end: int) -> None:
    if not 0 <= start <= end <= shape[dim]:
        raise ValueError(
            f"range [{start}, {end}) is outside dim {dim} of {name} (shape {list(shape)})"
        )
