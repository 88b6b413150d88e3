"""The serving cluster: plan, distribute shards, open a session, generate.

Implements the API's GenerationBackend. A supervisor thread keeps a session over
the alive agents: it waits for `min_agents`, plans the split, makes sure every agent
holds its shard, opens the data links and hands the session to the scheduler. When
an agent is lost, the requests in flight fail with a 503 naming it and the
supervisor re-plans over the agents that remain; new agents are taken in when idle.
Any other failure inside a step resets the session the same way (same plan, shards
cached). Every call to an agent has a deadline and agents are called in parallel: an
agent that misses one is marked dead, named in the log and left out of plans for a
while, so it delays a re-plan by its deadline at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from edgecluster.api.backend import BackendBusy, BackendUnavailable, SamplingParams
from edgecluster.comm.communicator import Communicator, serving_algorithm
from edgecluster.config import CoordinatorConfig
from edgecluster.engine.hub import HubModel
from edgecluster.errors import EdgeClusterError, PeerLostError
from edgecluster.net.datachannel import DataListener
from edgecluster.net.grpc_util import open_channel
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from edgecluster.plan.cluster_file import load_links
from edgecluster.plan.tensor_parallel import (
    AgentCapacity,
    AgentPlacement,
    TensorParallelPlan,
    plan_within_kv_budget,
)
from edgecluster.runtime.agent_calls import (
    AgentCallsFailed,
    open_deadline_s,
)
from edgecluster.runtime.capacity import check_hub_memory
from edgecluster.runtime.membership import Membership
from edgecluster.runtime.roster import Roster
from edgecluster.runtime.scheduler import GenRequest, Scheduler
from edgecluster.runtime.session_open import SessionLinks, open_session
from edgecluster.runtime.shard_distribution import distribute, shard_key
from edgecluster.runtime.tokenizer import ChatTokenizer
from edgecluster.types import MemberInfo
from edgecluster.weights.checkpoint import Checkpoint
from edgecluster.weights.models import model_fingerprint
from edgecluster.weights.slicing import hub_tensors
from edgecluster.weights.weight_mode import choose_weights

log = logging.getLogger(__name__)

AGENT_RUNTIME_BYTES = 400 << 20  # python + torch + grpc in an agent, measured ~350 MiB
READY_WAIT_S = 60.0
QUEUE_RETRY_AFTER_S = 1.0  # the batch turns over in steps of milliseconds to seconds
AUTO_KV_CONTEXTS = 2  # default KV budget: two full contexts, lowered to what agents hold


@dataclass
class _Session:
    plan: TensorParallelPlan
    members: dict[str, MemberInfo]
    comm: Communicator
    bytes_sent: dict[str, int]


class ServingCluster:
    def __init__(
        self,
        config: CoordinatorConfig,
        membership: Membership,
        model_dir: Path,
        name: str,
        *,
        supervise: bool = True,
    ) -> None:
        self.config = config
        self._membership = membership
        self._name = name
        self.checkpoint = Checkpoint(model_dir)
        self.cfg = self.checkpoint.model_config
        self.tokenizer = ChatTokenizer(model_dir)
        self.weights = choose_weights(
            model_dir,
            weights=config.weights,
            dtype=config.dtype,
            storage_dtype=config.storage_dtype,
        )
        log.info("serving %s: %s", name, self.weights.describe())
        self._dtype = getattr(torch, self.weights.compute_dtype)
        self._storage_dtype = self.weights.storage_dtype
        self._kv_dtype = config.kv_dtype or self.weights.compute_dtype
        self.hub = HubModel(
            self.cfg,
            _owned(hub_tensors(self.checkpoint, self.cfg, self._dtype)),
            self._dtype,
            max_context=self.context_length,
            weights=self.weights.mode,
        )
        self.checkpoint.close()  # the hub's tensors are copies: let the file mapping go
        check_hub_memory(config.memory_limit_bytes, self.hub.weight_bytes)
        self._model_id = model_fingerprint(model_dir, config.cache_dir)
        self._listener = DataListener(config.host, config.data_port)
        self._session_links = SessionLinks(
            listener=self._listener, host=config.host, token=config.token,
            encrypt=config.tls.serves_tls, link_delay_ms=config.link_delay_ms,
            link_table=load_links(config.cluster_file) if config.cluster_file else None,
        )  # fmt: skip
        self.scheduler = Scheduler()
        self.scheduler.on_lost = self._lost
        self.scheduler.on_failed = self._step_failed
        self._roster = Roster(membership)
        self._state = "waiting for agents"
        self._session: _Session | None = None
        self._served_once = False
        self._need_plan = threading.Event()
        self._need_plan.set()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        if supervise:
            membership.subscribe(self._membership_event)
            self._thread.start()

    # ---- GenerationBackend ----
    @property
    def model_name(self) -> str:
        return self._name

    @property
    def context_length(self) -> int:
        return min(self.config.max_context, self.cfg.max_position_embeddings)

    @property
    def eos_token_ids(self) -> Sequence[int]:
        return self.tokenizer.eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def state(self) -> str:
        return "ready" if self._ready.is_set() else self._state

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        loop = asyncio.get_running_loop()
        if not self._ready.is_set():
            ready = await loop.run_in_executor(None, self._ready.wait, READY_WAIT_S)
            if not ready:
                raise BackendUnavailable(f"the cluster is not ready: {self._state}")
        self._check_queue()  # no await from here to submit: the bound holds
        queue: asyncio.Queue[tuple[int | None, Exception | None]] = asyncio.Queue()

        def emit(token: int | None, error: Exception | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (token, error))

        request = GenRequest(
            prompt_ids=list(prompt_ids),
            params=params,
            eos_ids=frozenset(self.eos_token_ids),
            emit=emit,
        )
        self.scheduler.check_fits(request)
        req = self.scheduler.submit(request)
        try:
            while True:
                token, error = await queue.get()
                if error is not None:
                    raise error
                if token is None:
                    return
                yield token
        finally:
            self.scheduler.cancel(req)

    def _check_queue(self) -> None:
        """BackendBusy (429) when --max-queue requests already wait for the batch."""
        waiting, bound = self.scheduler.waiting, self.config.max_queue
        if waiting >= bound:
            raise BackendBusy(
                f"the server is busy: {waiting} requests are already waiting for a place in "
                f"the batch (the coordinator's --max-queue is {bound})",
                retry_after_s=QUEUE_RETRY_AFTER_S,
            )

    # ---- cluster view ----
    def cluster_view(self) -> dict[str, Any]:
        session = self._session
        placements = {p.node_id: p for p in session.plan.placements} if session else {}
        agents = []
        for member in self._membership.snapshot():
            entry: dict[str, Any] = member.to_json()
            placement = placements.get(member.id)
            entry["shard"] = _shard_json(placement, member) if placement else None
            agents.append(entry)
        return {
            "model": self._name,
            "state": self.state(),
            "dtype": self.weights.compute_dtype,
            "storage_dtype": self._storage_dtype,
            "weights": self.weights.mode,
            "weights_reason": self.weights.reason,
            "hub": {
                "weight_bytes": self.hub.weight_bytes,
                "bytes_per_token": self.hub.bytes_per_token,
                "weights": self.hub.weights,
            },
            "agents": agents,
        }

    # ---- supervision ----
    def _membership_event(self, member: MemberInfo, event: str) -> None:
        session = self._session
        in_session = session is not None and member.id in session.members
        if event in ("dead", "left") and in_session:
            self._replan(f"agent {member.name} is {event}")
        elif event in ("joined", "updated") and not in_session:
            self._need_plan.set()  # taken in by the supervisor once idle

    def _lost(self, exc: EdgeClusterError) -> None:
        session = self._session
        # Re-plan first, with the precise reason ("no data or keepalive from X ..."): the
        # requests in flight fail with it. Marking the agent dead afterwards finds no
        # session, so its membership event does not fail them again with a vaguer one.
        self._replan(str(exc))
        if session is not None and isinstance(exc, PeerLostError):
            for member in session.members.values():
                if member.name == exc.peer:
                    self._membership.mark_dead(member.id)

    def _step_failed(self, exc: Exception) -> None:
        """A step failed for another reason: the links may be mid-step, so reopen the
        session (same plan, cached shards); agents drop the old one and its KV."""
        self._replan(f"resetting after a failed step ({type(exc).__name__}: {exc})")

    def _replan(self, reason: str) -> None:
        log.warning("re-planning: %s", reason)
        self._ready.clear()
        self._state = f"re-planning ({reason})"
        comm = self.scheduler.detach(f"{reason}; the coordinator is re-planning, retry shortly")
        if comm is not None:
            comm.close()
        self._session = None
        self._need_plan.set()

    def _supervise(self) -> None:
        while not self._stop.is_set():
            self._need_plan.wait(0.5)
            if self._stop.is_set() or not self._need_plan.is_set():
                continue
            # A session in use is replaced (new agents taken in) only when no request is
            # mid-generation; requests that arrive meanwhile wait for the new session.
            held = self._session is not None
            if held and not self.scheduler.hold():
                continue
            self._need_plan.clear()
            try:
                self._establish()
            except AgentCallsFailed as exc:
                if not self._roster.drop_unresponsive(exc):
                    self._membership.wait_for_change(2.0)
                self._state = f"cannot serve yet: {exc}"
                self._need_plan.set()
            except (EdgeClusterError, grpc.RpcError) as exc:
                log.warning("could not establish a session: %s", exc)
                self._state = f"cannot serve yet: {exc}"
                self._need_plan.set()
                self._membership.wait_for_change(2.0)
            except Exception:  # the supervisor must outlive any bug in one attempt
                log.exception("could not establish a session")
                self._need_plan.set()
                self._stop.wait(2.0)
            finally:
                if held:
                    self.scheduler.release()

    def _establish(self) -> None:
        alive = self._roster.eligible()
        # --min-agents gates the first attempt; afterwards (even when that attempt lost an
        # agent) the survivors serve if they can
        needed = 1 if self._served_once else self.config.min_agents
        if len(alive) < needed:
            self._state = f"waiting for agents ({len(alive)}/{needed} alive)"
            self._need_plan.set()
            self._membership.wait_for_change(1.0)
            return
        self._served_once = True
        plan = self.plan(alive)
        current = self._session
        if current and _same_plan(current.plan, plan) and self.scheduler.attached(current.comm):
            return
        self.open_session(plan, alive)
        log.info("serving %s on %d agents", self._name, len(plan.placements))

    def open_session(self, plan: TensorParallelPlan, members: list[MemberInfo]) -> Communicator:
        """Replaces the session with one following `plan`; returns its communicator."""
        old, self._session = self._session, None
        self._ready.clear()
        if old is not None:
            self.scheduler.detach("the coordinator is re-planning")
            old.comm.close()
        self._session = self._open(plan, {m.id: m for m in members})
        self._served_once = True
        self._state = "ready"
        self._ready.set()
        return self._session.comm

    def plan(
        self, alive: list[MemberInfo], weights: Sequence[float] | None = None
    ) -> TensorParallelPlan:
        """The split over `alive` (by measured capacity, or by `weights` when given)."""
        self._state = "planning"
        capacities = [
            AgentCapacity(
                node_id=m.id,
                name=m.name,
                matmul_gflops=self._roster.planned_gflops(m),
                memory_budget_bytes=m.profile.memory_budget_bytes,
                runtime_bytes=m.profile.runtime_rss_bytes or AGENT_RUNTIME_BYTES,
                disk_read_bytes_per_s=m.profile.disk_read_bytes_per_s,
            )
            for m in alive
        ]
        plan = plan_within_kv_budget(
            capacities,
            self.cfg,
            kv_budget_tokens=self.config.kv_budget_tokens or AUTO_KV_CONTEXTS * self.context_length,
            fixed_budget=bool(self.config.kv_budget_tokens),
            storage_bytes_per_element=getattr(torch, self._storage_dtype).itemsize,
            compute_bytes_per_element=self._dtype.itemsize,
            kv_bytes_per_element=getattr(torch, self._kv_dtype).itemsize,
            weights=weights,
            weights_mode=self.weights.mode,
        )
        log.info("plan:\n%s", plan.describe())
        return plan

    def _open(self, plan: TensorParallelPlan, members: dict[str, MemberInfo]) -> _Session:
        from tqdm import tqdm

        used = {p.node_id: members[p.node_id] for p in plan.placements}
        stubs = {nid: self._stub(m) for nid, m in used.items()}
        keys = {
            p.node_id: shard_key(self._model_id, p, self._storage_dtype, self.weights.mode)
            for p in plan.placements
        }
        self._state = "distributing shards"
        total = sum(p.weight_bytes for p in plan.placements)
        with tqdm(total=total, unit="B", unit_scale=True, desc="distributing shards") as bar:
            sent = distribute(
                stubs, self.checkpoint, self.cfg, plan.placements, keys,
                self._storage_dtype, bar.update, self.weights.mode,
            )  # fmt: skip
        self._state = "loading"
        comm = self._connect(plan, used, stubs, keys)
        return _Session(plan=plan, members=used, comm=comm, bytes_sent=sent)

    def _connect(
        self,
        plan: TensorParallelPlan,
        members: dict[str, MemberInfo],
        stubs: dict[str, pb_grpc.AgentStub],
        keys: dict[str, str],
    ) -> Communicator:
        order = [members[p.node_id] for p in plan.placements]
        placement = {p.node_id: p for p in plan.placements}

        def fields_for(rank: int, member: MemberInfo) -> dict[str, Any]:
            return dict(
                algorithm=serving_algorithm(), shard_key=keys[member.id],
                compute_dtype=self.weights.compute_dtype,
                window_blocks=placement[member.id].window_blocks,
                max_context=self.context_length, kv_dtype=self._kv_dtype,
                kv_budget_tokens=plan.kv_budget_tokens,
            )  # fmt: skip

        try:
            comm = open_session(
                self._session_links, uuid.uuid4().hex, order, stubs, fields_for=fields_for,
                deadline_for=lambda m: open_deadline_s(placement[m.id].weight_bytes),
            )  # fmt: skip
        except PeerLostError as exc:  # its session opened, its data link did not
            for member in order:
                if member.name == exc.peer:
                    why = f"its data link did not open ({exc})"
                    self._roster.drop_hung(member.id, member.name, why)
            raise
        self.scheduler.kv_budget_tokens = plan.kv_budget_tokens
        self.scheduler.attach(self.hub, comm)
        return comm

    def _stub(self, member: MemberInfo) -> pb_grpc.AgentStub:
        channel = open_channel(member.address, self.config.token, self.config.tls)
        return pb_grpc.AgentStub(channel)

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def close(self) -> None:
        self._stop.set()
        self._need_plan.set()
        comm = self.scheduler.detach("the coordinator is shutting down")
        self.scheduler.stop()  # joins the step thread: the links are ours now
        if comm is not None:
            with contextlib.suppress(EdgeClusterError):
                self.hub.end(comm)  # agents end the session without reporting a lost hub
            comm.close()
        self._listener.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def _owned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies out of the checkpoint's file mapping, keeping tied tensors tied."""
    copies: dict[int, torch.Tensor] = {}
    return {n: copies.setdefault(id(t), t.clone()) for n, t in tensors.items()}


def _same_plan(a: TensorParallelPlan, b: TensorParallelPlan) -> bool:
    return a.placements == b.placements and a.kv_budget_tokens == b.kv_budget_tokens


def _shard_json(p: AgentPlacement, member: MemberInfo) -> dict[str, Any]:
    """The planned shard, with what the agent reports of it (it decides streaming)."""
    s, rt = p.spec, member.runtime
    reported = bool(rt.session_id)
    return {
        "rank": p.rank,
        "q_heads": [s.q_head_start, s.q_head_end],
        "kv_heads": [s.kv_head_start, s.kv_head_end],
        "mlp_columns": [s.mlp_col_start, s.mlp_col_end],
        "weight_bytes": rt.weight_bytes if reported else p.weight_bytes,
        "resident_weight_bytes": rt.resident_weight_bytes if reported else None,
        "streaming": rt.streaming if reported else p.streaming,
        "window_blocks": rt.window_blocks if reported else p.window_blocks,
        "read_bytes_per_s": rt.read_bytes_per_s,
    }
