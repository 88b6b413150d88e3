"""The coordinator's side of one training session: open it, move units, run steps.

A `TrainingSession` is rank 0 of a session whose ranks 1..N are the plan's agents.
It never computes a stage: it sends data and commands, gathers losses, decides each
iteration's verdict, and gathers units for checkpoints. Any loss of a peer raises
PeerLostError naming it (the agent that noticed tells the coordinator who), after
the coordinator has interrupted every other agent, so the caller can re-plan.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from edgecluster.comm.communicator import Communicator
from edgecluster.comm.mailbox import Mailbox
from edgecluster.model_config import ModelConfig
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.runtime.agent_calls import close_sessions
from edgecluster.runtime.session_open import SessionLinks, open_session
from edgecluster.train import spec as m
from edgecluster.train.executor import SEED
from edgecluster.train.spec import TrainingSpec
from edgecluster.train.units import Baseline
from edgecluster.types import MemberInfo

log = logging.getLogger(__name__)
OPEN_DEADLINE_S = 60.0


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float
    tokens: int
    iteration_s: float
    busy_s: Mapping[str, float]


class TrainingSession:
    def __init__(
        self, links: SessionLinks, spec: TrainingSpec, members: Sequence[MemberInfo]
    ) -> None:
        """`members[i]` is rank i + 1."""
        self.spec = spec
        self.members = list(members)
        self.names = ["coordinator", *[mem.name for mem in members]]
        self._links = links
        self.session_id = uuid.uuid4().hex
        assert links.stub_for is not None
        self._stubs: dict[str, pb_grpc.AgentStub] = {mem.id: links.stub_for(mem) for mem in members}
        self.comm = self._open()
        self.mbox = Mailbox(self.comm)
        self.comm.begin_step()

    def _open(self) -> Communicator:
        training_json = self.spec.to_json()
        return open_session(
            self._links, self.session_id, self.members, self._stubs,
            fields_for=lambda rank, member: {
                "algorithm": "ring", "compute_dtype": "float32", "kind": "training",
                "training_json": training_json,
            },
            deadline_for=lambda member: OPEN_DEADLINE_S,
        )  # fmt: skip

    # ---- units ----
    def initialize(self, *, step: int, baseline: Baseline, cfg: ModelConfig) -> int:
        """Places every unit; returns the step training goes on from.

        Each agent says what it retains; a unit comes from the agent itself, else from
        a peer that retains it at `step`. When some unit is nowhere at `step`, every
        unit comes from `baseline` (the coordinator, or the seed) and training goes on
        from the baseline's step: the caller says so (a roll-back)."""
        have: dict[int, tuple[int, set[int]]] = {}
        for rank in range(1, len(self.names)):
            _, (msg,) = self.mbox.recv((m.HAVE, 0, 0, 0), rank)
            values = msg.tolist()
            have[rank] = (int(values[0]), {int(u) for u in values[1:]})
        holders: dict[int, list[int]] = {}
        for rank, (at, units) in have.items():
            if at == step:
                for u in units:
                    holders.setdefault(u, []).append(rank)
        needed = {rank: self.spec.units_of(rank) for rank in have}
        complete = all(u in holders for units in needed.values() for u in units)
        base_src = SEED if baseline.kind == "seed" else 0
        rows = [
            (u, (rank if rank in holders[u] else holders[u][0]) if complete else base_src, rank)
            for rank, units in needed.items()
            for u in units
        ]
        start = step if complete else baseline.step
        from_base = sorted({u for u, src, _ in rows if src == 0})
        states = baseline.unit_states(cfg, from_base) if from_base else {}
        for rank in range(1, len(self.names)):
            mine = [r for r in rows if rank in (r[1], r[2])]
            table = torch.tensor(mine, dtype=torch.int64).reshape(-1)
            self.mbox.send(rank, (m.INIT, 0, 0, 0), table, torch.tensor([start], dtype=torch.int64))
        for u, src, dst in rows:
            if src == 0:
                self.mbox.send(dst, (m.STATE, u, 0, 0), *states[u])
        return start

    def gather(self, units: Sequence[int]) -> dict[int, list[torch.Tensor]]:
        """Each unit's state from the first agent that holds it."""
        asked: dict[int, list[int]] = {}
        for u in units:
            rank = next(r for r in self.spec.ranks if u in self.spec.units_of(r))
            asked.setdefault(rank, []).append(u)
        for rank, mine in asked.items():
            self._command(rank, m.GATHER, 0, 0)
            self.mbox.send(rank, (m.UNITS, 0, 0, 0), torch.tensor(mine, dtype=torch.int64))
        out: dict[int, list[torch.Tensor]] = {}
        for rank, mine in asked.items():
            for u in mine:
                out[u] = self.mbox.recv((m.STATE, u, 0, 0), rank)[1]
        return out

    # ---- steps ----
    def iterate(self, step: int, batch: Callable[[int], torch.Tensor]) -> StepResult:
        """One synchronous iteration; committed only when every agent finished it."""
        started = time.perf_counter()
        for rank in self.spec.ranks:
            self._command(rank, m.ITERATE, step, 0)
        sources = self.spec.sources()
        for mb, rank in enumerate(sources):
            self.mbox.send(rank, (m.DATA, step, mb, 0), batch(mb))
        loss_sum, tokens = 0.0, 0
        for mb, rank in enumerate(sources):
            _, (report,) = self.mbox.recv((m.LOSS, step, mb, 0), rank)
            loss_sum += float(report[0])
            tokens += int(report[1])
        busy: dict[str, float] = {}
        for rank in self.spec.ranks:
            _, (ready,) = self.mbox.recv((m.READY, step, 0, 0), rank)
            busy[self.names[rank]] = float(ready[0])
        verdict = torch.tensor([1], dtype=torch.int64)
        for rank in self.spec.ranks:  # every survivor commits, whoever fails meanwhile
            try:
                self.mbox.send(rank, (m.VERDICT, step, 0, 0), verdict)
            except Exception as exc:  # noqa: BLE001 - its loss shows in the next step
                log.warning("verdict of step %d did not reach %s: %s", step, self.names[rank], exc)
        return StepResult(
            step=step, loss=loss_sum / max(tokens, 1), tokens=tokens,
            iteration_s=time.perf_counter() - started, busy_s=busy,
        )  # fmt: skip

    def evaluate(self, round_: int, batches: Sequence[torch.Tensor]) -> float:
        """Mean token loss over `batches`, forward only along stages' first replicas."""
        for rank in self.spec.ranks:
            self._command(rank, m.EVALUATE, round_, len(batches))
        source = self.spec.stages[0].ranks[0]
        for b, ids in enumerate(batches):
            self.mbox.send(source, (m.EVAL_DATA, round_, b, 0), ids)
        loss_sum, tokens = 0.0, 0.0
        for b in range(len(batches)):
            _, (report,) = self.mbox.recv((m.EVAL_LOSS, round_, b, 0), source)
            loss_sum, tokens = loss_sum + float(report[0]), tokens + float(report[1])
        return loss_sum / max(tokens, 1.0)

    def _command(self, rank: int, command: int, step: int, arg: int) -> None:
        self.mbox.send(
            rank, (m.CMD, 0, 0, 0), torch.tensor([command, step, arg], dtype=torch.int64)
        )

    def interrupt(self, reason: str) -> None:
        self.mbox.interrupt_all(reason)

    def close(self, *, stop: bool) -> None:
        if stop:
            for rank in self.spec.ranks:
                with contextlib.suppress(Exception):  # closing anyway
                    self._command(rank, m.STOP, 0, 0)
        self.mbox.close()
        self.comm.close()
        self._links.listener.forget(self.session_id)
        if not stop:
            close_sessions(self._stubs, self.session_id)
