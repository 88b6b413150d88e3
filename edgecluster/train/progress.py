"""What a training run shows: the terminal bar, the JSON log, `GET /v1/training`.

`TrainingProgress` is fed by the driver (plan, steps, evals, events) and read by the
HTTP handler from another thread, so every read takes a snapshot under a lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from edgecluster.plan.pipeline import PipelinePlan
from edgecluster.plan.pipeline_describe import plan_to_dict
from edgecluster.train.session import StepResult

log = logging.getLogger(__name__)
RECENT_STEPS = 200


class TrainingProgress:
    def __init__(self, *, steps: int, schedule: str, log_json: Path | None, bar: bool) -> None:
        self._lock = threading.Lock()
        self.steps = steps
        self.schedule = schedule
        self.state = "starting"
        self.step = 0
        self.started = time.monotonic()
        self.plan: dict[str, Any] | None = None
        self.predicted_iteration_s: float | None = None
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.eval_loss: float | None = None
        self.held_out = ""
        self._log: TextIO | None = None
        if log_json is not None:
            log_json.parent.mkdir(parents=True, exist_ok=True)
            self._log = log_json.open("a", encoding="utf-8")
        self._bar: Any = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=steps, desc="training", unit="step", dynamic_ncols=True)

    # ---- fed by the driver ----
    def set_state(self, state: str) -> None:
        with self._lock:
            if state == "training" and not self.history and self.state != "training":
                self.started = time.monotonic()  # elapsed_s counts from the first iteration
            self.state = state
        if self._bar is not None:
            self._bar.set_description_str(state[:40])

    def event(self, message: str) -> None:
        log.warning("%s", message)
        with self._lock:
            self.events.append(
                {"t_s": round(time.monotonic() - self.started, 3), "message": message}
            )
        self._write({"event": "note", "message": message})

    def planned(self, plan: PipelinePlan, agents: dict[str, int]) -> None:
        with self._lock:
            self.plan = plan_to_dict(plan) | {"ranks": agents}
            self.predicted_iteration_s = plan.iteration_s

    def resumed(self, step: int) -> None:
        with self._lock:
            self.step = step
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def stepped(self, result: StepResult, eval_loss: float | None) -> dict[str, Any]:
        with self._lock:
            self.step = result.step + 1
            if eval_loss is not None:
                self.eval_loss = eval_loss
            record = {
                "step": result.step + 1,
                "loss": round(result.loss, 6),
                "eval_loss": None if eval_loss is None else round(eval_loss, 6),
                "iteration_s": round(result.iteration_s, 4),
                "predicted_iteration_s": self.predicted_iteration_s,
                "tokens": result.tokens,
                "tokens_per_s": round(result.tokens / result.iteration_s, 1),
                "elapsed_s": round(time.monotonic() - self.started, 3),
                "busy": {
                    name: round(min(1.0, busy / result.iteration_s), 3)
                    for name, busy in result.busy_s.items()
                },
                "schedule": self.schedule,
            }
            self.history.append(record)
            del self.history[:-RECENT_STEPS]
        self._write(record)
        if self._bar is not None:
            self._bar.update(1)
            shown = {"loss": f"{result.loss:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}",
                     "it": f"{result.iteration_s:.2f}s"}  # fmt: skip
            if self.eval_loss is not None:
                shown["eval"] = f"{self.eval_loss:.4f}"
            busy = {n: min(1.0, b / result.iteration_s) for n, b in result.busy_s.items()}
            shown["busy"] = " ".join(f"{v:.0%}" for v in busy.values())
            self._bar.set_postfix(shown, refresh=True)
        return record

    def evaluated(self, step: int, eval_loss: float) -> None:
        """An evaluation outside a step (the one before training starts)."""
        with self._lock:
            self.eval_loss = eval_loss
        log.info("eval loss at step %d: %.4f", step, eval_loss)
        self._write({"event": "eval", "step": step, "eval_loss": round(eval_loss, 6)})

    def done(self, steps: int, checkpoint: Path | None) -> None:
        self.set_state("done")
        self._write({"event": "done", "steps": steps, "checkpoint": str(checkpoint or "")})
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    # ---- read by /v1/training ----
    def view(self) -> dict[str, Any]:
        with self._lock:
            last = self.history[-1] if self.history else None
            per_step = (
                sum(r["iteration_s"] for r in self.history[-10:]) / len(self.history[-10:])
                if self.history
                else None
            )
            return {
                "state": self.state,
                "schedule": self.schedule,
                "step": self.step,
                "steps": self.steps,
                "loss": last["loss"] if last else None,
                "eval_loss": self.eval_loss,
                "tokens_per_s": last["tokens_per_s"] if last else None,
                "iteration_s": last["iteration_s"] if last else None,
                "predicted_iteration_s": self.predicted_iteration_s,
                "eta_s": None
                if per_step is None
                else round(per_step * (self.steps - self.step), 1),
                "busy": last["busy"] if last else {},
                "held_out": self.held_out,
                "plan": self.plan,
                "events": list(self.events[-50:]),
                "history": [
                    {k: r[k] for k in ("step", "loss", "eval_loss", "elapsed_s")}
                    for r in self.history
                ],
            }
