"""`edge-coordinator train`: plan a pipeline over the agents, drive it, survive losses.

The coordinator holds no stage. It waits for `--min-agents`, plans (stages, paths,
orders) for the agents alive, opens a training session with them, places the
units (from the agents that retain them, else from its baseline: the model being
fine-tuned, the last checkpoint, or the seed), and runs iterations: data to each
micro-batch's source, losses and READYs back, a commit verdict. Every
`--eval-every` steps it evaluates on the held-out tokens; every
`--checkpoint-every` steps, and at the end, it gathers the units into a Hugging
Face directory plus the training state.

A lost agent drops the iteration in flight (nobody steps without a verdict). The
coordinator re-plans over the agents left (new ones join here), takes each unit
from a surviving replica, or, when some unit survived nowhere, rolls everyone back
to the last checkpoint, and goes on. It stops with a clear message only when no plan
fits the agents left.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from edgecluster.errors import PeerLostError, PlanError
from edgecluster.model_config import ModelConfig
from edgecluster.plan.cluster_file import ClusterSpec, DeviceSpec, LinkSpec, load_cluster_file
from edgecluster.plan.pipeline import PipelinePlan, plan_pipeline
from edgecluster.plan.pipeline_describe import describe_plan
from edgecluster.runtime.agent_calls import AgentCallsFailed
from edgecluster.runtime.membership import Membership
from edgecluster.runtime.session_open import SessionLinks
from edgecluster.train.checkpoint import (
    TRAINING_STATE_DIR,
    save_hf_checkpoint,
    save_training_state,
)
from edgecluster.train.data import BatchSampler, load_texts, prepare_tokens, tokenizer_for
from edgecluster.train.options import TrainOptions
from edgecluster.train.progress import TrainingProgress
from edgecluster.train.resume import find_latest_checkpoint
from edgecluster.train.session import TrainingSession
from edgecluster.train.spec import Hyper, spec_from_plan
from edgecluster.train.units import Baseline, state_to_named, unit_names
from edgecluster.types import MemberInfo

log = logging.getLogger(__name__)
LOCAL_LINK = LinkSpec(latency_ms=0.1, bandwidth_mb_s=1000.0)  # unmeasured links: a LAN
EXCLUDE_LOST_S = 60.0  # a lost agent stays out of plans this long (unless it rejoins anew)


def load_model(spec: str, cache_dir: Path) -> tuple[ModelConfig, Path | None]:
    """(config, checkpoint dir); a CONFIG.json trains from scratch (no directory)."""
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        try:
            return ModelConfig.from_hf_dict(json.loads(path.read_text())), None
        except (ValueError, KeyError) as exc:
            raise ValueError(f"--model {spec}: not a usable config.json ({exc})") from exc
    from edgecluster.weights.checkpoint import Checkpoint
    from edgecluster.weights.models import resolve_model

    model_dir = resolve_model(spec, cache_dir)
    with Checkpoint(model_dir) as ckpt:
        return ckpt.model_config, model_dir


def cluster_of(members: list[MemberInfo], cluster_file: Path | None) -> ClusterSpec:
    """The planner's cluster: the file's devices and links for the agents it names, else
    each agent's measured profile on LAN-like links."""
    if cluster_file is not None:
        spec = load_cluster_file(cluster_file)
        known = {d.name: d for d in spec.devices}
        missing = [mem.name for mem in members if mem.name not in known]
        if missing:
            raise PlanError(
                f"agents {', '.join(missing)} are not devices of {cluster_file}; name each agent "
                f"(edge-agent join --name) as a device of the file ({', '.join(known)})"
            )
        devices = tuple(known[mem.name] for mem in members)
        return replace(spec, devices=devices)
    devices = tuple(
        DeviceSpec(
            name=mem.name,
            gflops=max(mem.profile.matmul_gflops, 0.1),
            memory_bytes=mem.profile.memory_budget_bytes or (1 << 34),
            cpu_quota=mem.profile.cpu_limit or float(mem.profile.cpu_count or 1),
            disk_read_bytes_per_s=max(mem.profile.disk_read_bytes_per_s, 1.0),
        )
        for mem in members
    )
    return ClusterSpec(devices=devices, default_link=LOCAL_LINK)


class TrainingRun:
    def __init__(
        self,
        options: TrainOptions,
        *,
        membership: Membership,
        links: SessionLinks,
        cache_dir: Path,
        min_agents: int,
    ) -> None:
        self.options = options
        self._membership = membership
        self._links = links
        self._min_agents = max(1, min_agents)
        self.cfg, self.model_dir = load_model(options.model, cache_dir)
        self.names = unit_names(self.cfg)
        self.run_id = uuid.uuid4().hex
        self.baseline = (
            Baseline(kind="weights", path=self.model_dir)
            if self.model_dir
            else Baseline(kind="seed")
        )
        self.progress = TrainingProgress(
            steps=options.steps,
            schedule=options.pipeline.schedule,
            log_json=options.log_json,
            bar=options.progress,
        )
        self._excluded: dict[str, float] = {}
        self.checkpoint_dir = options.checkpoint_dir or Path("edgecluster-checkpoints")
        self.sampler: BatchSampler | None = None
        if not options.dry_run:
            self._read_data()

    def _read_data(self) -> None:
        """Tokenizes `--data` and holds out its tail: before any agent is waited for, so a
        bad file or a tokenizer that does not fit fails at once."""
        o, p = self.options, self.options.pipeline
        tokenizer = tokenizer_for(self.model_dir, self.cfg)
        data = prepare_tokens(load_texts(o.data), tokenizer, o.held_out_fraction)
        self.progress.held_out = data.description()
        log.info("data: %s", data.description())
        self.sampler = BatchSampler(
            data, seq_len=p.seq_len, micro_batch_size=p.micro_batch_size, seed=p.seed
        )
        self.held_out = self.sampler.eval_batches(o.eval_batches)

    # ---- the run ----
    def run(self, stop: threading.Event) -> Path | None:
        """Trains to `--steps`; returns the final checkpoint (None when stopped early)."""
        o, p, sampler, held_out = self.options, self.options.pipeline, self.sampler, self.held_out
        assert sampler is not None, "a dry run trains nothing"
        step = self._resume_step()
        eval_round = 0
        while step < o.steps and not stop.is_set():
            members = self.wait_for_agents(stop)
            if members is None:
                return None
            plan, ranked = self._plan(members)
            session = self._open(plan, ranked)
            if session is None:
                continue  # an agent did not take its part: planned again without it
            try:
                step = self._place(session, step)
                if o.eval_every and eval_round == 0:  # where the run starts from
                    eval_round += 1
                    self.progress.evaluated(step, session.evaluate(eval_round, held_out))
                while step < o.steps and not stop.is_set():
                    first = step * p.num_micro_batches
                    result = session.iterate(step, partial(_nth_batch, sampler, first))
                    step += 1
                    eval_loss = None
                    if step == o.steps or (o.eval_every and step % o.eval_every == 0):
                        eval_round += 1
                        eval_loss = session.evaluate(eval_round, held_out)
                    self.progress.stepped(result, eval_loss)
                    if o.checkpoint_every and step % o.checkpoint_every == 0 and step < o.steps:
                        self._checkpoint(session, step, f"step-{step:06d}")
                if step < o.steps:  # stopped (Ctrl-C): keep what was done, for --resume
                    saved = self._checkpoint(session, step, f"step-{step:06d}")
                    session.close(stop=True)
                    self.progress.event(f"stopped at step {step}; --resume goes on from {saved}")
                    return None
                final = self._checkpoint(session, step, "final")
                session.close(stop=True)
                self.progress.done(step, final)
                return final
            except PeerLostError as exc:
                session.interrupt(str(exc))
                session.close(stop=False)
                self._excluded[exc.peer] = time.monotonic()
                self.progress.event(f"re-planning: {exc}; the iteration in flight was dropped")
            except BaseException:
                session.interrupt("the coordinator stopped")
                session.close(stop=False)
                raise
        return None

    def _open(self, plan: PipelinePlan, ranked: list[MemberInfo]) -> TrainingSession | None:
        """The plan's session; None (the agents that failed to open it are left out for
        a while) when an agent refused it, missed its deadline or did not connect."""
        try:
            return TrainingSession(self._links, self._spec(plan, ranked), ranked)
        except AgentCallsFailed as exc:
            failed = [f.name for f in exc.failures]
            reason = str(exc)
        except PeerLostError as exc:
            failed, reason = [exc.peer], str(exc)
        now = time.monotonic()
        for name in failed:
            self._excluded[name] = now
        self.progress.event(f"re-planning without {', '.join(failed)}: {reason}")
        return None

    def _resume_step(self) -> int:
        if not self.options.resume:
            return 0
        found = find_latest_checkpoint(self.checkpoint_dir, self.cfg)
        if found is None:
            self.progress.event(f"--resume: no checkpoint in {self.checkpoint_dir}; starting at 0")
            return 0
        path, step = found
        self.baseline = Baseline(kind="checkpoint", step=step, path=path)
        self.progress.resumed(step)
        log.info("resuming from %s at step %d", path, step)
        return step

    def _place(self, session: TrainingSession, step: int) -> int:
        self.progress.set_state("placing units")
        start = session.initialize(step=step, baseline=self.baseline, cfg=self.cfg)
        if start != step:
            self.progress.event(
                f"some layers survived on no agent: rolled back from step {step} to "
                f"{self.baseline.describe()}"
            )
            self.progress.resumed(start)
        self.progress.set_state("training")
        return start

    def wait_for_agents(self, stop: threading.Event) -> list[MemberInfo] | None:
        needed = self._min_agents
        while not stop.is_set():
            now = time.monotonic()
            self._excluded = {n: t for n, t in self._excluded.items() if now - t < EXCLUDE_LOST_S}
            alive = [  # joined and compute-ready (its data channel is open)
                mem
                for mem in self._membership.alive()
                if mem.data_port and mem.name not in self._excluded
            ]
            if len(alive) >= needed:
                self._min_agents = 1  # after a loss, the survivors go on if a plan fits
                return sorted(alive, key=lambda mem: mem.name)
            self.progress.set_state(f"waiting for agents ({len(alive)}/{needed})")
            self._membership.wait_for_change(1.0)
        return None

    def _plan(self, members: list[MemberInfo]) -> tuple[PipelinePlan, list[MemberInfo]]:
        self.progress.set_state("planning")
        cluster = cluster_of(members, self.options.cluster_file)
        try:
            plan = plan_pipeline(cluster, self.cfg, self.options.pipeline)
        except PlanError as exc:
            names = ", ".join(mem.name for mem in members)
            raise PlanError(f"no training plan fits the agents left ({names}): {exc}") from exc
        by_name = {mem.name: mem for mem in members}
        ranked = [by_name[name] for name in plan.allocation.agents]
        self.progress.planned(plan, {mem.name: r for r, mem in enumerate(ranked, 1)})
        log.info("training plan:\n%s", describe_plan(plan))
        return plan, ranked

    def _spec(self, plan: PipelinePlan, ranked: list[MemberInfo]):  # type: ignore[no-untyped-def]
        p, o = self.options.pipeline, self.options
        hyper = Hyper(
            lr=o.lr, weight_decay=o.weight_decay, optimizer=o.optimizer,
            micro_batch_size=p.micro_batch_size,
            seq_len=p.seq_len, num_micro_batches=p.num_micro_batches, seed=p.seed,
        )  # fmt: skip
        rank_of = {mem.name: r for r, mem in enumerate(ranked, 1)}
        return spec_from_plan(
            run_id=self.run_id, model=self.cfg, plan=plan, rank_of=rank_of, hyper=hyper
        )

    def _checkpoint(self, session: TrainingSession, step: int, name: str) -> Path:
        self.progress.set_state(f"checkpointing step {step}")
        states = session.gather(sorted(self.names))
        tensors, optimizer = {}, {}
        for unit, state in states.items():
            params, moments = state_to_named(self.names[unit], state)
            tensors.update(params)
            optimizer.update(moments)
        out = self.checkpoint_dir / name
        base = self.model_dir / "config.json" if self.model_dir else None
        base_config = json.loads(base.read_text()) if base and base.is_file() else None
        save_hf_checkpoint(
            out, self.cfg, tensors, tokenizer_dir=self.model_dir, base_config=base_config
        )
        p = self.options.pipeline
        save_training_state(
            out / TRAINING_STATE_DIR, step=step, data_position=step * p.num_micro_batches,
            rng={"seed": p.seed},
            optimizer=optimizer,
            meta={"run_id": self.run_id, "model": json.loads(self.cfg.to_json()),
                  "schedule": p.schedule, "micro_batches": p.num_micro_batches,
                  "micro_batch": p.micro_batch_size, "seq_len": p.seq_len},
        )  # fmt: skip
        self.baseline = Baseline(kind="checkpoint", step=step, path=out)
        log.info("checkpoint: %s (step %d)", out, step)
        self.progress.set_state("training")
        return out


def _nth_batch(sampler: BatchSampler, first: int, micro_batch: int) -> torch.Tensor:
    return sampler.batch(first + micro_batch)
