"""An optimizer's per-parameter state as named tensors, for checkpoints and hand-over.

Names are "<state key>/<HF parameter name>" ("exp_avg/model.layers.3.mlp.up_proj.weight",
"step/..."), so a stage's AdamW state can be saved, loaded on another stage split or
moved to a surviving replica by name. Hyper-parameters (lr, betas) are not state:
the caller rebuilds the optimizer with them before loading.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """Copies of the state of each parameter in `params` (keyed by HF name)."""
    out: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        for key, value in optimizer.state.get(param, {}).items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{key}/{name}"] = tensor.detach().clone()
    return out


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, nn.Parameter],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Set the state of each parameter in `params` from `tensors` (names as above).

    A parameter without any state is left fresh (not stepped yet); names of parameters
    not in `params` and state of the wrong shape are errors.
    """
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for full, tensor in tensors.items():
        key, sep, name = full.partition("/")
        if not sep or name not in params:
            raise ValueError(
                f"optimizer state {full!r} belongs to no parameter of this stage; the state "
                "comes from a different model or stage split"
            )
        by_param.setdefault(name, {})[key] = tensor
    for name, state in by_param.items():
        param = params[name]
        for key, tensor in state.items():
            if tensor.dim() and tensor.shape != param.shape:
                raise ValueError(
                    f"optimizer state {key}/{name} has shape {list(tensor.shape)}, the "
                    f"parameter {list(param.shape)}"
                )
        optimizer.state[param] = {
            key: tensor.clone() if key == "step" else tensor.to(param.device, copy=True)
            for key, tensor in state.items()
        }
