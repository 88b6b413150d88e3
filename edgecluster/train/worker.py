"""An agent's share of a training run: its stages' modules, their optimizer, their units.

Pure compute, no I/O: the executor (executor.py) feeds it messages. A unit's state
(parameters, AdamW moments, AdamW step) moves as a list of tensors in a fixed order
(`unit_state` / `load_unit_state`), so agents and the coordinator agree on it without
names on the wire.

Gradients: every micro-batch's loss is the SUM of its token losses, so after the
backward passes a stage's gradients are sums over the micro-batches that visited it.
`finish_gradients` divides them by (tokens per micro-batch x micro-batches that
visited the stage): each stage steps on the mean token gradient of the data that
reached it. With full paths (GPipe, 1F1B) that is the plain mean over the batch;
with skipping paths a stage that 2 of 3 micro-batches visit is not scaled down by
the third it never saw (SkipPipe divides by the replica count instead; see the README).
"""

from __future__ import annotations

import torch
from torch import nn

from edgecluster.train.model import EmbedHeadStage, LayerStage, init_parameters
from edgecluster.train.spec import EMBED_HEAD, TrainingSpec


class StageWorker:
    def __init__(self, spec: TrainingSpec, rank: int) -> None:
        self.spec = spec
        self.rank = rank
        self.modules: dict[int, nn.Module] = {}
        for stage in spec.stages_of(rank):
            with torch.device("meta"):  # no default init: the units are loaded or seeded
                module: nn.Module = (
                    EmbedHeadStage(spec.model)
                    if stage.index == 0
                    else LayerStage(spec.model, stage.layer_start, stage.layer_end)
                )
            module.to_empty(device="cpu")
            if isinstance(module, EmbedHeadStage):
                module.tie_weights()
            self.modules[stage.index] = module
        self.units: dict[int, list[nn.Parameter]] = {}
        for index, module in self.modules.items():
            if index == 0:
                self.units[EMBED_HEAD] = list(module.parameters())
            else:
                assert isinstance(module, LayerStage)
                start = spec.stages[index].layer_start
                for i, layer in enumerate(module.layers):
                    self.units[start + i] = list(layer.parameters())
        hyper = spec.hyper
        params = [p for unit in self.units.values() for p in unit]
        self.optimizer: torch.optim.Optimizer
        if hyper.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=hyper.lr, foreach=False)
        else:
            self.optimizer = torch.optim.AdamW(
                params,
                lr=hyper.lr,
                betas=hyper.betas,
                eps=hyper.eps,
                weight_decay=hyper.weight_decay,
                foreach=False,  # per tensor: the same arithmetic whatever the split
            )

    @property
    def stage0(self) -> EmbedHeadStage:
        module = self.modules[0]
        assert isinstance(module, EmbedHeadStage), "stage 0 is the embedding and the head"
        return module

    def init_from_seed(self) -> None:
        for module in self.modules.values():
            init_parameters(module, self.spec.model, self.spec.hyper.seed)

    # ---- unit state ----
    def unit_state(self, unit: int) -> list[torch.Tensor]:
        """params..., exp_avg..., exp_avg_sq..., [step] (moments zero before the first step)."""
        params = self.units[unit]
        out = [p.detach() for p in params]
        step = 0.0
        for key in ("exp_avg", "exp_avg_sq"):
            for p in params:
                state = self.optimizer.state.get(p)
                out.append(state[key] if state else torch.zeros_like(p))
        for p in params:
            state = self.optimizer.state.get(p)
            if state:
                step = float(state["step"])
        out.append(torch.tensor([step], dtype=torch.float32))
        return out

    @torch.no_grad()
    def load_unit_state(self, unit: int, tensors: list[torch.Tensor]) -> None:
        params = self.units[unit]
        n = len(params)
        if len(tensors) == n:  # parameters only (a checkpoint without optimizer state)
            tensors = tensors + [torch.zeros_like(p) for p in params] * 2 + [torch.zeros(1)]
        if len(tensors) != 3 * n + 1:
            raise ValueError(f"unit {unit}: {len(tensors)} tensors, expected {3 * n + 1}")
        step = float(tensors[-1][0])
        for i, p in enumerate(params):
            if tensors[i].shape != p.shape:
                raise ValueError(
                    f"unit {unit}: parameter {i} has shape {list(tensors[i].shape)}, "
                    f"expected {list(p.shape)}"
                )
            p.copy_(tensors[i])
            if step > 0:
                self.optimizer.state[p] = {
                    "step": torch.tensor(step),
                    "exp_avg": tensors[n + i].clone(),
                    "exp_avg_sq": tensors[2 * n + i].clone(),
                }
            else:
                self.optimizer.state.pop(p, None)

    # ---- gradients ----
    def stage_params(self, stage: int) -> list[nn.Parameter]:
        return [p for u in self.spec.stages[stage].units for p in self.units[u]]

    def flat_grad(self, stage: int) -> torch.Tensor:
        grads = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
            for p in self.stage_params(stage)
        ]
        return torch.cat(grads)

    @torch.no_grad()
    def set_flat_grad(self, stage: int, flat: torch.Tensor, divisor: float) -> None:
        offset = 0
        for p in self.stage_params(stage):
            n = p.numel()
            p.grad = (flat[offset : offset + n] / divisor).reshape(p.shape).clone()
            offset += n

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def drop_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
