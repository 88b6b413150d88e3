"""Pure planners: (cluster profile, model config, options) -> plan dataclasses.

Nothing here does I/O or imports `net`; the coordinator only applies plans.
"""

from edgecluster.plan.streaming import WindowChoice, choose_window
from edgecluster.plan.tensor_parallel import (
    AgentCapacity,
    AgentPlacement,
    TensorParallelPlan,
    plan_tensor_parallel,
)

__all__ = [
    "AgentCapacity",
    "AgentPlacement",
    "TensorParallelPlan",
    "WindowChoice",
    "choose_window",
    "plan_tensor_parallel",
]
