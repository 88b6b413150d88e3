"""What a training session tells each agent: the plan as ranks, and the hyper-parameters.

The coordinator sends the same `TrainingSpec` to every agent of a training session
(JSON in `SessionSpec.training_json`, parsed and validated, never evaluated); each
agent runs `orders[its rank]`. Ranks: 0 is the coordinator, agents 1..N.

A *unit* is what moves between agents and checkpoints: `embed_head` (stage 0: the
embedding, the final norm, the LM head) or `layer.<i>`. Stages are unit ranges, so a
re-plan that cuts layers differently still finds every unit somewhere.

Message kinds on the session's mailbox (tag = (kind, a, b, c)) and the commands follow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edgecluster.model_config import ModelConfig

# message kinds (the tag's first field)
INIT = 1  # coordinator -> agent: (INIT, 0, 0, 0) int64 [units...] sources, see executor
STATE = 2  # unit state: (STATE, unit, 0, 0) params..., exp_avg..., exp_avg_sq..., [step]
CMD = 3  # coordinator -> agent: (CMD, step, 0, 0) int64 [command, arg]
DATA = 4  # coordinator -> source: (DATA, step, micro-batch, 0) int64 [B, T+1]
ACT = 5  # activation: (ACT, step, micro-batch, hop)
GRAD = 6  # gradient: (GRAD, step, micro-batch, hop)
LOSS = 7  # source -> coordinator: (LOSS, step, micro-batch, 0) float64 [loss_sum, tokens]
READY = 8  # agent -> coordinator: (READY, step, 0, 0) float64 [busy_s, peak_rss]
VERDICT = 9  # coordinator -> agent: (VERDICT, step, 0, 0) int64 [1 commit | 0 drop]
REDUCE = 10  # replicas' gradient all-reduce: (REDUCE, step, stage, ring step)
HAVE = 12  # agent -> coordinator: (HAVE, 0, 0, 0) int64 [step, units...] it retains
EVAL_ACT = 13  # (EVAL_ACT, round, batch, hop)
EVAL_DATA = 14  # coordinator -> eval source: (EVAL_DATA, round, batch, 0) int64 [B, T+1]
UNITS = 15  # coordinator -> agent, after GATHER: (UNITS, 0, 0, 0) int64 [units to send]
EVAL_LOSS = 16  # eval source -> coordinator: (EVAL_LOSS, round, batch, 0) [loss_sum, tokens]

# commands
ITERATE = 1  # arg: unused
EVALUATE = 2  # arg: number of eval batches (data follows to the eval source)
GATHER = 3  # every agent sends the units it is asked for: INIT-style list follows
STOP = 4

EMBED_HEAD = -1  # unit number of stage 0's parameters; layers are 0..L-1


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    index: int
    layer_start: int
    layer_end: int
    ranks: tuple[int, ...]

    @property
    def units(self) -> tuple[int, ...]:
        if self.index == 0:
            return (EMBED_HEAD,)
        return tuple(range(self.layer_start, self.layer_end))


@dataclass(frozen=True, kw_only=True)
class Hyper:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    micro_batch_size: int = 1
    seq_len: int = 128
    num_micro_batches: int = 8
    seed: int = 0
    optimizer: str = "adamw"  # adamw | sgd (plain: parameter -= lr * gradient)

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"--optimizer {self.optimizer!r}: choose adamw or sgd")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    run_id: str
    model: ModelConfig
    stages: tuple[StageSpec, ...]
    paths: tuple[tuple[tuple[int, int], ...], ...]  # per micro-batch: (stage, rank) hops
    orders: Mapping[int, tuple[tuple[int, str, int], ...]]  # rank -> (micro-batch, F|L|B, stage)
    hyper: Hyper = field(default_factory=Hyper)

    def __post_init__(self) -> None:
        ranks = {r for s in self.stages for r in s.ranks}
        if [s.index for s in self.stages] != list(range(len(self.stages))):
            raise ValueError("stages must be numbered 0..S-1 in order")
        layers = [u for s in self.stages[1:] for u in s.units]
        if layers != list(range(self.model.num_layers)):
            raise ValueError(
                f"the layer stages cover layers {layers}, not 0..{self.model.num_layers - 1}"
            )
        for m, hops in enumerate(self.paths):
            if hops[0] != hops[-1] or hops[0][0] != 0:
                raise ValueError(f"micro-batch {m}: a path starts and ends at stage 0, same rank")
            for stage, rank in hops:
                if not 0 <= stage < len(self.stages) or rank not in self.stages[stage].ranks:
                    raise ValueError(f"micro-batch {m}: hop ({stage}, {rank}) is not in the plan")
        if set(self.orders) - ranks:
            raise ValueError(
                f"orders for ranks {sorted(set(self.orders) - ranks)} outside the plan"
            )
        if len(self.paths) != self.hyper.num_micro_batches:
            raise ValueError(
                f"{len(self.paths)} paths for {self.hyper.num_micro_batches} micro-batches"
            )

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({r for s in self.stages for r in s.ranks}))

    def stages_of(self, rank: int) -> tuple[StageSpec, ...]:
        return tuple(s for s in self.stages if rank in s.ranks)

    def units_of(self, rank: int) -> tuple[int, ...]:
        return tuple(u for s in self.stages_of(rank) for u in s.units)

    def visits(self, stage: int) -> int:
        """Micro-batches whose path visits `stage` (stage 0: every one)."""
        return sum(1 for hops in self.paths if any(s == stage for s, _ in hops))

    def sources(self) -> tuple[int, ...]:
        """Each micro-batch's stage-0 rank."""
        return tuple(hops[0][1] for hops in self.paths)

    def to_json(self) -> str:
        return json.dumps(
            {
                "run_id": self.run_id,
                "model": json.loads(self.model.to_json()),
                "stages": [asdict(s) for s in self.stages],
                "paths": [[list(h) for h in hops] for hops in self.paths],
                "orders": {str(r): [list(a) for a in acts] for r, acts in self.orders.items()},
                "hyper": asdict(self.hyper),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> TrainingSpec:
        try:
            raw = json.loads(text)
            hyper = dict(raw["hyper"])
            hyper["betas"] = tuple(hyper["betas"])
            return cls(
                run_id=str(raw["run_id"]),
                model=ModelConfig.from_json(json.dumps(raw["model"])),
                stages=tuple(
                    StageSpec(
                        index=int(s["index"]),
                        layer_start=int(s["layer_start"]),
                        layer_end=int(s["layer_end"]),
                        ranks=tuple(int(r) for r in s["ranks"]),
                    )
                    for s in raw["stages"]
                ),
                paths=tuple(tuple((int(s), int(r)) for s, r in hops) for hops in raw["paths"]),
                orders={
                    int(r): tuple((int(m), _kind(k), int(s)) for m, k, s in acts)
                    for r, acts in raw["orders"].items()
                },
                hyper=Hyper(**hyper),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"training spec is malformed: {exc}") from exc


def _kind(k: Any) -> str:
    if k not in ("F", "L", "B"):
        raise ValueError(f"action kind {k!r} is not F, L or B")
    return str(k)


def spec_from_plan(
    *,
    run_id: str,
    model: ModelConfig,
    plan: Any,
    rank_of: Mapping[str, int],
    hyper: Hyper,
) -> TrainingSpec:
    """The spec of a PipelinePlan whose agents are ranked by `rank_of`."""
    stages = tuple(
        StageSpec(
            index=s.index,
            layer_start=s.layer_start,
            layer_end=s.layer_end,
            ranks=tuple(rank_of[a] for a in s.agents),
        )
        for s in plan.allocation.stages
    )
    paths = tuple(tuple((h.stage, rank_of[h.agent]) for h in p.hops) for p in plan.paths)
    orders = {
        rank_of[agent]: tuple((a.micro_batch, a.kind, a.stage) for a in actions)
        for agent, actions in plan.orders.items()
    }
    return TrainingSpec(
        run_id=run_id, model=model, stages=stages, paths=paths, orders=orders, hyper=hyper
    )


def hop_index(hops: Sequence[tuple[int, int]], stage: int, kind: str) -> int:
    """Where on its path an action runs: stage 0's F is hop 0, its L the last hop."""
    if stage == 0:
        return len(hops) - 1 if kind == "L" else 0
    for i, (s, _) in enumerate(hops[1:-1], start=1):
        if s == stage:
            return i
    raise ValueError(f"stage {stage} is not on the path {hops}")
