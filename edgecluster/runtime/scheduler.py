"""Continuous batching over the distributed model, on one thread.

Every step packs, for each active request, either its next prompt chunk (prefill,
at most `max_step_tokens` tokens per step in all) or its one new token (decode),
runs one forward pass across the cluster, and samples for every request whose
prompt is consumed. Requests join and leave between steps, so concurrent requests
share every step (batched) rather than waiting in line.

A lost agent fails every active request with BackendUnavailable naming it; the
scheduler then waits until a new session is attached. Any other exception in a step
does the same (the links may be mid-step, so the session is dropped and `on_failed`
asks for a fresh one): the loop itself never dies. A request the hub would refuse
(a token id outside the vocabulary, positions past the context) is answered 400 at
admission and never reaches a step. The owner (`on_lost` / `on_failed`) hears of a
failure before the requests do, and a session is replaced between steps only
(`hold`): a re-plan never fails a request that has not started.

Admission is bounded by the session's KV budget (`kv_budget_tokens`, the positions
the plan reserved on every agent): a request is admitted, first come first served,
only while the admitted requests' reach (prompt + max_tokens each, in whole KV
blocks) fits the budget; otherwise it waits. One that can never fit fails with a
400 naming the knobs that would make room.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from edgecluster.api.backend import BackendUnavailable, SamplingParams
from edgecluster.api.errors import ApiError, bad_request
from edgecluster.comm.communicator import Communicator
from edgecluster.engine.hub import HubModel, StepInputError
from edgecluster.engine.kv_cache import kv_blocks_tokens
from edgecluster.engine.sampling import sample_token
from edgecluster.errors import EdgeClusterError

log = logging.getLogger(__name__)

# emit(token, error): token is a new id; token None and error None means finished.
Emit = Callable[[int | None, Exception | None], None]


@dataclass(kw_only=True)
class GenRequest:
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    emit: Emit
    seq_id: int = 0
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def kv_tokens(self) -> int:
        """KV positions this request can come to hold on every agent (whole blocks)."""
        return kv_blocks_tokens(len(self.prompt_ids) + self.params.max_tokens)


def kv_budget_error(need_tokens: int, budget_tokens: int) -> ApiError:
    """The 400 for a request whose KV reach exceeds the whole budget."""
    return bad_request(
        f"this request can hold up to {need_tokens} KV positions (prompt + max_tokens, in "
        f"blocks) but the cluster's KV budget is {budget_tokens} tokens. Lower max_tokens or "
        "shorten the prompt, or make room on the coordinator: raise serve --kv-budget, "
        "--max-context, keep the KV cache in bf16 (--kv-dtype bfloat16), raise the agents' "
        "--memory-limit, or add agents",
        code="kv_budget_exceeded",
    )


class Scheduler:
    def __init__(self, *, max_step_tokens: int = 512, max_batch: int = 16) -> None:
        self._max_step_tokens = max_step_tokens
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._waiting: list[GenRequest] = []
        self._active: list[GenRequest] = []
        self._session: tuple[HubModel, Communicator] | None = None
        self.kv_budget_tokens = 0  # 0: no bound (set with the session's plan)
        self._ids = itertools.count(1)
        self._stop = False
        self._held = False  # no new step while the session is being replaced
        self._stepping = False  # a step (or its retirement) is using the session
        self.on_lost: Callable[[EdgeClusterError], None] = lambda exc: None
        # Any other failure inside a step: the session must be reset.
        self.on_failed: Callable[[Exception], None] = lambda exc: None
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    # ---- control ----
    def attach(self, hub: HubModel, comm: Communicator) -> None:
        with self._cond:
            self._session = (hub, comm)
            self._held = False
            self._cond.notify_all()

    def detach(self, reason: str) -> Communicator | None:
        """Drops the session; fails active requests with `reason`. Returns its comm."""
        with self._cond:
            session, self._session = self._session, None
            failed, self._active = self._active, []
        for req in failed:
            req.emit(None, BackendUnavailable(reason))
        return session[1] if session else None

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._active or self._waiting)

    @property
    def waiting(self) -> int:
        """Requests submitted but not yet in the running batch."""
        with self._cond:
            return len(self._waiting)

    def submit(self, req: GenRequest) -> GenRequest:
        with self._cond:
            req.seq_id = next(self._ids)
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    def cancel(self, req: GenRequest) -> None:
        with self._cond:
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # ---- the loop ----
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (
                    self._session is None or self._held or not self._has_work()
                ):
                    self._cond.wait()
                if self._stop:
                    return
                session = self._session
                assert session is not None
                self._admit(session[0])
                batch = list(self._active)
                self._stepping = True
            try:
                self._step(*session, batch)
            except EdgeClusterError as exc:
                log.warning("step failed: %s", exc)
                self._after_failure(session, batch, str(exc), self.on_lost, exc)
            except Exception as exc:  # a bug or bad input below the API: reset, keep serving
                log.exception("step failed; resetting the session")
                reason = (
                    f"a generation step failed ({type(exc).__name__}: {exc}); "
                    "the coordinator is resetting the session, retry shortly"
                )
                self._after_failure(session, batch, reason, self.on_failed, exc)
            finally:
                with self._cond:
                    self._stepping = False
                    self._cond.notify_all()

    def _after_failure(
        self,
        session: tuple[HubModel, Communicator],
        batch: list[GenRequest],
        reason: str,
        handler: Callable[[Any], None],
        exc: Exception,
    ) -> None:
        """The owner hears of a failed session first (so it stops saying 'ready' before
        any client hears of the failure); then the step's requests fail and its links
        close. A session replaced meanwhile (a re-plan) concerns nobody but its batch."""
        with self._cond:
            current = self._session is session
        if current:
            self._notify(handler, exc)
        with self._cond:
            current = self._session is session
        if current:
            self.detach(reason)
        else:
            with self._cond:
                self._active = [r for r in self._active if r not in batch]
            for req in batch:  # those the owner's detach failed already ignore a second error
                req.emit(None, BackendUnavailable(reason))
        try:
            session[1].close()
        except Exception:
            log.exception("closing the failed session's links")

    def hold(self) -> bool:
        """Stops taking steps if no request is mid-generation (True), so the session can
        be replaced without failing anyone; waiting requests stay queued. False when
        requests are active. `release` (or `attach`) resumes."""
        with self._cond:
            if self._active or self._stepping:
                return False
            self._held = True
            return True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def attached(self, comm: Communicator) -> bool:
        """Whether `comm` is the session the scheduler steps on."""
        with self._cond:
            return self._session is not None and self._session[1] is comm

    @staticmethod
    def _notify(handler: Callable[[Any], None], exc: Exception) -> None:
        try:
            handler(exc)
        except Exception:
            log.exception("the scheduler's failure handler failed")

    def _has_work(self) -> bool:
        return bool(self._waiting or self._active)

    def check_fits(self, req: GenRequest) -> None:
        """Raises the 400 when `req` can never fit the KV budget."""
        budget = self.kv_budget_tokens
        if budget and req.kv_tokens > budget:
            raise kv_budget_error(req.kv_tokens, budget)

    def _admit(self, hub: HubModel) -> None:
        budget = self.kv_budget_tokens
        held = sum(r.kv_tokens for r in self._active)
        while self._waiting and len(self._active) < self._max_batch:
            req = self._waiting[0]
            if budget and req.kv_tokens > budget:  # the budget shrank under it
                self._waiting.pop(0)
                req.emit(None, kv_budget_error(req.kv_tokens, budget))
                continue
            if budget and held + req.kv_tokens > budget:
                return  # it waits for KV room, and so do those behind it
            self._waiting.pop(0)
            try:  # refused here, never half-sent in a step
                hub.check_tokens(req.prompt_ids, more=req.params.max_tokens - 1)
            except StepInputError as exc:
                req.emit(None, bad_request(str(exc), param="prompt"))
                continue
            self._active.append(req)
            held += req.kv_tokens

    def _step(self, hub: HubModel, comm: Communicator, batch: list[GenRequest]) -> None:
        finished = [r for r in batch if r.cancelled]
        batch = [r for r in batch if not r.cancelled]
        segments, tokens, sampling = self._pack(batch)
        if segments:
            logits = hub.forward(comm, torch.tensor(tokens, dtype=torch.int64), segments)
            for row, req in sampling:
                if req.cancelled:
                    continue
                token = sample_token(logits[row], req.params, req.generator)
                req.generated.append(token)
                req.emit(token, None)
                if token in req.eos_ids or len(req.generated) >= req.params.max_tokens:
                    finished.append(req)
        self._retire(hub, comm, finished)

    def _pack(
        self, batch: list[GenRequest]
    ) -> tuple[list[tuple[int, int, int]], list[int], list[tuple[int, GenRequest]]]:
        segments: list[tuple[int, int, int]] = []
        tokens: list[int] = []
        sampling: list[tuple[int, GenRequest]] = []
        budget = self._max_step_tokens
        for req in batch:
            if req.prefilled < len(req.prompt_ids):  # prefill the next prompt chunk
                if budget <= 0:
                    continue
                chunk = req.prompt_ids[req.prefilled : req.prefilled + budget]
                segments.append((req.seq_id, req.prefilled, len(chunk)))
                tokens.extend(chunk)
                req.prefilled += len(chunk)
                budget -= len(chunk)
                if req.prefilled < len(req.prompt_ids):
                    continue
            else:  # decode its last token
                position = len(req.prompt_ids) + len(req.generated) - 1
                segments.append((req.seq_id, position, 1))
                tokens.append(req.generated[-1])
            sampling.append((len(segments) - 1, req))
        return segments, tokens, sampling

    def _retire(self, hub: HubModel, comm: Communicator, finished: list[GenRequest]) -> None:
        if not finished:
            return
        with self._cond:
            for req in finished:
                if req in self._active:
                    self._active.remove(req)
        hub.free(comm, [r.seq_id for r in finished])
        for req in finished:
            req.emit(None, None)
