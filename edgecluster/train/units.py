"""Units by name: which Hugging Face tensors make each unit, and the coordinator's copy.

A unit's state travels as `params..., exp_avg..., exp_avg_sq..., [step]` (see
worker.py); here that list meets the names a checkpoint uses. The coordinator holds
no stage, only a *baseline*: where units come from when no agent has them (the
fine-tuned checkpoint, a training checkpoint, or the seed), and at which step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from edgecluster.model_config import ModelConfig
from edgecluster.train.model import EmbedHeadStage, LayerStage, read_hf_weights
from edgecluster.train.spec import EMBED_HEAD


def unit_names(cfg: ModelConfig) -> dict[int, list[str]]:
    """Every unit's parameters as Hugging Face names, in the order the worker keeps them."""
    with torch.device("meta"):
        head = EmbedHeadStage(cfg)
        layers = LayerStage(cfg, 0, cfg.num_layers)
    names: dict[int, list[str]] = {
        EMBED_HEAD: [head.hf_names()[n] for n, _ in head.named_parameters()]
    }
    hf = layers.hf_names()
    for i in range(cfg.num_layers):
        prefix = f"layers.{i}."
        names[i] = [hf[n] for n, _ in layers.named_parameters() if n.startswith(prefix)]
    return names


def state_to_named(
    names: list[str], state: list[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A unit's state list as (parameters, optimizer tensors) by name."""
    n = len(names)
    params = {name: state[i] for i, name in enumerate(names)}
    optimizer: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        optimizer[f"exp_avg/{name}"] = state[n + i]
        optimizer[f"exp_avg_sq/{name}"] = state[2 * n + i]
        optimizer[f"step/{name}"] = state[3 * n].clone()
    return params, optimizer


@dataclass(frozen=True, kw_only=True)
class Baseline:
    """Where the coordinator takes units from: `kind` seed | weights | checkpoint."""

    kind: str
    step: int = 0
    path: Path | None = None

    def describe(self) -> str:
        if self.kind == "seed":
            return "random initialisation from the seed (step 0)"
        return f"{self.kind} {self.path} (step {self.step})"

    def unit_states(self, cfg: ModelConfig, units: list[int]) -> Mapping[int, list[torch.Tensor]]:
        """Each unit's state list (parameters only for plain weights)."""
        assert self.path is not None, "a seed baseline has no tensors"
        names = unit_names(cfg)
        wanted = [name for u in units for name in names[u]]
        weights = read_hf_weights(self.path, wanted)
        optimizer: Mapping[str, torch.Tensor] = {}
        if self.kind == "checkpoint":
            from edgecluster.train.checkpoint import TRAINING_STATE_DIR, load_training_state

            optimizer = load_training_state(self.path / TRAINING_STATE_DIR).optimizer
        out: dict[int, list[torch.Tensor]] = {}
        for u in units:
            state = [weights[name].float() for name in names[u]]
            if optimizer:
                state += [optimizer[f"exp_avg/{n}"] for n in names[u]]
                state += [optimizer[f"exp_avg_sq/{n}"] for n in names[u]]
                state.append(optimizer[f"step/{names[u][0]}"].reshape(1).float())
            out[u] = state
        return out
