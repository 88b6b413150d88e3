"""An agent's training session: run the plan's orders, iteration after iteration.

The coordinator (rank 0) drives; the agent answers (message kinds in spec.py):

1. Start: the agent says which units it retains from an earlier session of this run
   (HAVE: step, units), the coordinator answers where each of its units comes from
   (INIT rows `unit, from, to`: from itself, from a peer, from the coordinator or from
   the seed) and the units move.
2. Commands (CMD), in order:
   - ITERATE: run `orders[rank]` exactly. F at stage 0 embeds the micro-batch's
     tokens (DATA from the coordinator); F elsewhere runs the stage on the activation
     from the previous hop and keeps what backward needs; L computes the loss
     (reported to the coordinator), its backward, and sends the gradient back; B
     runs the stage's backward and sends the input's gradient back. Then, stage by
     stage in index order, the replicas all-reduce their gradients, the agent reports
     READY and waits for the coordinator's VERDICT: commit (AdamW step) or drop.
   - EVALUATE: forward only, along one full path through each stage's first replica.
   - GATHER: send the units the coordinator asks for (checkpoints).
   - STOP.
3. A loss before READY: the agent tells everyone which peer was lost (the
   communicator's abort) and drops its gradients; its units stay as of the last
   committed step and are retained in this process for the next session of the run.
   Nothing is ever half-applied: only a VERDICT steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from edgecluster.comm.communicator import Communicator
from edgecluster.comm.mailbox import Interrupted, Mailbox, Tag
from edgecluster.errors import PeerLostError, TensorMessageError
from edgecluster.train import spec as m
from edgecluster.train.spec import TrainingSpec, hop_index
from edgecluster.train.worker import StageWorker

log = logging.getLogger(__name__)
SEED = -2  # INIT source: initialise from the run's seed
COORDINATOR = 0


@dataclass
class Retained:
    """Units kept in this process after a session of a run ended, for the next one."""

    run_id: str = ""
    step: int = -1
    units: dict[int, list[torch.Tensor]] = field(default_factory=dict)


RETAINED = Retained()


def run_training_session(comm: Communicator, spec: TrainingSpec) -> int:
    """Runs the session until STOP or a loss; returns the steps committed in it."""
    mbox = Mailbox(comm)
    comm.begin_step()  # keepalives and read deadlines for the whole session
    worker = StageWorker(spec, comm.rank)
    session = _Session(comm, mbox, worker, spec)
    try:
        session.initialize()
        return session.serve()
    except (PeerLostError, TensorMessageError, Interrupted) as exc:
        lost = exc if isinstance(exc, PeerLostError) else PeerLostError("?", str(exc))
        if not isinstance(exc, Interrupted) and lost.peer != comm.peer_name(COORDINATOR):
            comm.abort(lost)  # every rank, the coordinator first, learns who was lost
        log.warning("training session ended: %s", exc)
        return session.committed
    finally:
        worker.drop_gradients()
        _retain(spec.run_id, session.step, worker)
        mbox.close()


def _retain(run_id: str, step: int, worker: StageWorker) -> None:
    if step < 0:
        return
    RETAINED.run_id, RETAINED.step = run_id, step
    RETAINED.units = {u: worker.unit_state(u) for u in worker.units}


class _Session:
    def __init__(
        self, comm: Communicator, mbox: Mailbox, worker: StageWorker, spec: TrainingSpec
    ) -> None:
        self.comm, self.mbox, self.worker, self.spec = comm, mbox, worker, spec
        self.rank = comm.rank
        self.step = -1  # the committed step the units are at (-1: not loaded)
        self.committed = 0
        self._kept: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._targets: dict[int, torch.Tensor] = {}

    # ---- start ----
    def initialize(self) -> None:
        have = RETAINED if RETAINED.run_id == self.spec.run_id else Retained()
        self.mbox.send(
            COORDINATOR,
            (m.HAVE, 0, 0, 0),
            torch.tensor([have.step, *have.units], dtype=torch.int64),
        )
        _, (rows, start) = self.mbox.recv((m.INIT, 0, 0, 0), COORDINATOR)
        self._move_units(rows.reshape(-1, 3).tolist(), have)
        self.step = int(start[0])
        RETAINED.units = {}  # the units live in the worker now

    def _move_units(self, rows: list[list[int]], have: Retained) -> None:
        for unit, src, dst in rows:  # sends first: every reader keeps reading
            if src == self.rank and dst != self.rank:
                state = have.units[unit] if unit in have.units else self.worker.unit_state(unit)
                self.mbox.send(dst, (m.STATE, unit, 0, 0), *state)
        seeded = False
        for unit, src, dst in rows:
            if dst != self.rank:
                continue
            if src == SEED:
                if not seeded:
                    self.worker.init_from_seed()
                    seeded = True
            elif src == self.rank:
                self.worker.load_unit_state(unit, have.units[unit])
            else:
                _, state = self.mbox.recv((m.STATE, unit, 0, 0), src)
                self.worker.load_unit_state(unit, state)

    # ---- commands ----
    def serve(self) -> int:
        while True:
            _, (cmd,) = self.mbox.recv((m.CMD, 0, 0, 0), COORDINATOR, interruptible=False)
            command, step, arg = (int(v) for v in cmd.tolist())
            if command == m.STOP:
                return self.committed
            self.mbox.clear_interrupt()
            if command == m.ITERATE:
                self.iterate(step)
            elif command == m.EVALUATE:
                self.evaluate(step, arg)
            elif command == m.GATHER:
                self.gather()
            else:
                raise TensorMessageError(f"the coordinator sent unknown command {command}")

    def iterate(self, step: int) -> None:
        busy = 0.0
        for micro_batch, kind, stage_index in self.spec.orders.get(self.rank, ()):
            busy += self._run(step, micro_batch, kind, stage_index)
        started = time.perf_counter()
        tokens = self.spec.hyper.micro_batch_size * self.spec.hyper.seq_len
        for index in sorted(self.worker.modules):
            stage = self.spec.stages[index]
            flat = self.worker.flat_grad(index)
            if len(stage.ranks) > 1:
                flat = self.mbox.all_reduce(flat, stage.ranks, (m.REDUCE, step, index, 0))
            self.worker.set_flat_grad(index, flat, float(tokens * self.spec.visits(index)))
        busy += time.perf_counter() - started
        self.mbox.send(
            COORDINATOR, (m.READY, step, 0, 0), torch.tensor([busy], dtype=torch.float64)
        )
        _, (verdict,) = self.mbox.recv((m.VERDICT, step, 0, 0), COORDINATOR, interruptible=False)
        if int(verdict[0]) == 1:
            self.worker.step()
            self.step, self.committed = step + 1, self.committed + 1
        else:
            self.worker.drop_gradients()

    def _run(self, step: int, mb: int, kind: str, stage: int) -> float:
        """One action of the order; returns its compute seconds (waits excluded)."""
        hops = self.spec.paths[mb]
        hop = hop_index(hops, stage, kind)
        module = self.worker.modules[stage]
        if kind == "F" and stage == 0:
            _, (ids,) = self.mbox.recv((m.DATA, step, mb, 0), COORDINATOR)
            started = time.perf_counter()
            self._targets[mb] = ids[:, 1:]
            out = self.worker.stage0.embed(ids[:, :-1])
            self._kept[(mb, 0)] = (None, out)
            self.mbox.send(hops[1][1], (m.ACT, step, mb, 1), out.detach())
            return time.perf_counter() - started
        if kind == "F":
            x = self._recv_activation((m.ACT, step, mb, hop), hops[hop - 1][1])
            started = time.perf_counter()
            out = module(x)
            self._kept[(mb, hop)] = (x, out)
            self.mbox.send(hops[hop + 1][1], (m.ACT, step, mb, hop + 1), out.detach())
            return time.perf_counter() - started
        if kind == "L":
            x = self._recv_activation((m.ACT, step, mb, hop), hops[hop - 1][1])
            started = time.perf_counter()
            loss = self.worker.stage0.loss(x, self._targets.pop(mb))
            loss.backward()
            assert x.grad is not None
            self.mbox.send(hops[hop - 1][1], (m.GRAD, step, mb, hop - 1), x.grad)
            tokens = float(self.spec.hyper.micro_batch_size * self.spec.hyper.seq_len)
            report = torch.tensor([float(loss.detach()), tokens], dtype=torch.float64)
            self.mbox.send(COORDINATOR, (m.LOSS, step, mb, 0), report)
            return time.perf_counter() - started
        x_in, out = self._kept.pop((mb, hop))
        _, (grad,) = self.mbox.recv((m.GRAD, step, mb, hop), hops[hop + 1][1], like=[out])
        started = time.perf_counter()
        out.backward(grad)
        if x_in is not None:
            assert x_in.grad is not None
            self.mbox.send(hops[hop - 1][1], (m.GRAD, step, mb, hop - 1), x_in.grad)
        return time.perf_counter() - started

    def _recv_activation(self, tag: Tag, src: int) -> torch.Tensor:
        hidden = self.spec.model.hidden_size
        _, (x,) = self.mbox.recv(tag, src)
        expected = (self.spec.hyper.micro_batch_size, self.spec.hyper.seq_len, hidden)
        if tuple(x.shape) != expected or x.dtype != torch.float32:
            raise TensorMessageError(
                f"{self.comm.peer_name(src)} sent a {x.dtype} {list(x.shape)} activation under "
                f"{tag}; a float32 {list(expected)} one was expected"
            )
        return x.requires_grad_(True)

    @torch.no_grad()
    def evaluate(self, round_: int, batches: int) -> None:
        hops = self.eval_path()
        for b in range(batches):
            for hop, (stage, rank) in enumerate(hops):
                if rank != self.rank:
                    continue
                module = self.worker.modules[stage]
                if hop == 0:
                    _, (ids,) = self.mbox.recv((m.EVAL_DATA, round_, b, 0), COORDINATOR)
                    self._targets[-1 - b] = ids[:, 1:]
                    out = self.worker.stage0.embed(ids[:, :-1])
                else:
                    _, (x,) = self.mbox.recv((m.EVAL_ACT, round_, b, hop), hops[hop - 1][1])
                    if hop == len(hops) - 1:
                        targets = self._targets.pop(-1 - b)
                        loss = self.worker.stage0.loss(x, targets)
                        report = torch.tensor([float(loss), targets.numel()], dtype=torch.float64)
                        self.mbox.send(COORDINATOR, (m.EVAL_LOSS, round_, b, 0), report)
                        continue
                    out = module(x)
                self.mbox.send(hops[hop + 1][1], (m.EVAL_ACT, round_, b, hop + 1), out)

    def eval_path(self) -> list[tuple[int, int]]:
        first = [(s.index, s.ranks[0]) for s in self.spec.stages]
        return [first[0], *first[1:], first[0]]

    def gather(self) -> None:
        _, (units,) = self.mbox.recv((m.UNITS, 0, 0, 0), COORDINATOR)
        for unit in units.tolist():
            self.mbox.send(COORDINATOR, (m.STATE, int(unit), 0, 0), *self.worker.unit_state(unit))
