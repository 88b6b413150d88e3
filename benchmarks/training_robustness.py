"""SkipPipe's robustness check: a trained checkpoint's eval loss with layers dropped.

A final checkpoint of `edge-coordinator train` is a Hugging Face directory; here
transformers loads it (`LlamaForCausalLM`, fp32) and keeps `fraction` of its decoder
layers, evenly spaced with the first and the last kept (`kept_layers`), by
replacing `model.model.layers`. The eval text is held-out KJV in byte tokens
(token id = byte value, the vocabulary the benchmark trains with), cut into
non-overlapping windows of the training sequence length; the loss is the mean
next-byte cross-entropy over every window, and perplexity its exp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

FRACTIONS = {"100%": 1.0, "75%": 0.75, "50%": 0.5}


def kept_layers(num_layers: int, fraction: float) -> list[int]:
    """round(fraction * num_layers) layer indices, evenly spaced, first and last kept."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    keep = min(num_layers, max(min(2, num_layers), int(num_layers * fraction + 0.5)))
    if keep == 1:
        return [0]
    step = (num_layers - 1) / (keep - 1)
    return [int(i * step + 0.5) for i in range(keep)]


def byte_windows(text: str, seq_len: int, num_windows: int) -> torch.Tensor:
    """[n, seq_len] byte ids: the first `num_windows` whole windows of `text` (n may be less)."""
    data = text.encode("utf-8")
    n = min(num_windows, len(data) // seq_len)
    if n < 1:
        raise ValueError(f"the eval text ({len(data)} bytes) is shorter than one window")
    ids = torch.frombuffer(bytearray(data[: n * seq_len]), dtype=torch.uint8)
    return ids.to(torch.long).view(n, seq_len)


def eval_loss(model: Any, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy of `model` over `windows` ([n, T] ids)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for chunk in windows.split(batch):
            logits = model(input_ids=chunk, use_cache=False).logits[:, :-1]  # [b, T-1, V]
            targets = chunk[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += targets.numel()
    return total / count


def with_layers(model: Any, keep: Sequence[int]) -> Any:
    """`model` with only decoder layers `keep` (in place; the dropped ones are gone)."""
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    return model


def robustness(
    checkpoints: Mapping[str, Path], windows: torch.Tensor
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per checkpoint, per kept fraction: kept layers, eval loss and perplexity."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, path in checkpoints.items():
        out[name] = {}
        for label, fraction in FRACTIONS.items():
            model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            keep = kept_layers(len(model.model.layers), fraction)
            loss = eval_loss(with_layers(model, keep), windows)
            out[name][label] = {"layers": keep, "loss": loss, "perplexity": math.exp(loss)}
    return out
