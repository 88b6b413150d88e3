"""Drive offload_child.py (transformers + Accelerate disk offload) inside an emulated device.

`AcceleratePeer.run` drops the page cache, starts the child in its own device and
process group, waits for it to load, drops the page cache again (loading read the
checkpoint), tells it to generate, and collects its per-token lines until it is
done, dies, or `timeout_s` (load included) runs out. The outcome says which,
honestly: "measured", "oom-killed", "exited with N" or "timed out after S s", with
the tokens that did arrive. Peak RSS is polled from /proc while the child lives,
so it is known even when the child is killed.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common import peak_rss_bytes
from coordinator_process import stop_process_group
from rss_sampler import RssSampler

from edgecluster.device.emulated import DeviceLimits, EmulatedDevice, drop_page_cache

HF_RUNTIME_BYTES = 400 << 20  # python + torch + transformers imported; the rest is max_memory
POLL_S = 0.5


@dataclass
class Outcome:
    status: str = "not started"
    load_s: float | None = None
    placement: dict[str, int] = field(default_factory=dict)
    times_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    read_bytes: list[int] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    peak_rss_by_kind: dict[str, int] = field(default_factory=dict)
    cap_bytes: int | None = None
    cgroup_peak_bytes: int | None = None
    oom_killed: bool = False
    max_memory_cpu_bytes: int | None = None
    log_path: str = ""

    def details(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "load_s": self.load_s,
            "placement": self.placement,
            "peak_rss_bytes": self.peak_rss_bytes,
            **{f"peak_rss_{k}_bytes": v for k, v in self.peak_rss_by_kind.items()},
            "cap_bytes": self.cap_bytes,
            "cgroup_peak_bytes": self.cgroup_peak_bytes,
            "oom_killed": self.oom_killed,
            "max_memory_cpu_bytes": self.max_memory_cpu_bytes,
            "log": self.log_path,
        }


@dataclass(frozen=True, kw_only=True)
class AcceleratePeer:
    model_dir: Path
    work_dir: Path  # on the throttled disk: the offload folder and the child's log
    limits: DeviceLimits
    cgroup_name: str
    timeout_s: float

    @property
    def cpu_bytes(self) -> int:
        assert self.limits.memory_bytes, "the peer runs under a memory cap"
        return self.limits.memory_bytes - HF_RUNTIME_BYTES

    def argv(self, prompt: list[int], new_tokens: int) -> list[str]:
        script = Path(__file__).with_name("offload_child.py")
        return [
            sys.executable, str(script), "--model", str(self.model_dir),
            "--offload-folder", str(self.work_dir / "offload"),
            "--cpu-bytes", str(self.cpu_bytes), "--prompt", ",".join(map(str, prompt)),
            "--new-tokens", str(new_tokens), "--threads", "1",
        ]  # fmt: skip

    def run(self, prompt: list[int], new_tokens: int, say: Callable[[str], None]) -> Outcome:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.work_dir / "accelerate.log"
        outcome = Outcome(
            cap_bytes=self.limits.memory_bytes,
            max_memory_cpu_bytes=self.cpu_bytes,
            log_path=str(log_path),
        )
        say(f"accelerate: max_memory cpu {self.cpu_bytes / 2**20:.0f} MiB; loading")
        drop_page_cache()
        with (
            EmulatedDevice(self.cgroup_name, self.limits, io_path=self.work_dir) as device,
            open(log_path, "wb") as log,
        ):
            proc = device.popen(
                self.argv(prompt, new_tokens), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, start_new_session=True,
            )  # fmt: skip
            try:
                with RssSampler({"accelerate": proc.pid}) as rss:
                    _Driver(proc, outcome, time.monotonic() + self.timeout_s, say).drive()
                    outcome.peak_rss_by_kind = rss.peaks["accelerate"]
            finally:
                stop_process_group(proc)
                outcome.cgroup_peak_bytes = device.peak_memory_bytes()
                outcome.oom_killed = device.oom_killed()
        if outcome.oom_killed and outcome.status != "measured":
            outcome.status = "oom-killed"
        return outcome


class _Driver:
    """Reads the child's JSON lines against a deadline, polling its peak RSS."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        outcome: Outcome,
        deadline: float,
        say: Callable[[str], None],
    ) -> None:
        self.proc, self.outcome, self.deadline, self.say = proc, outcome, deadline, say
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=_pump, args=(proc.stdout, self.lines), daemon=True).start()
        self.started = time.monotonic()

    def drive(self) -> None:
        while True:
            event = self._next_event()
            if event is None:
                return
            kind = event.get("event")
            if kind == "loaded":
                self._loaded(event)
            elif kind == "token":
                self._token(event)
            elif kind == "done":
                self.outcome.status = "measured"
                peak = max(self.outcome.peak_rss_bytes or 0, int(event["peak_rss_bytes"]))
                self.outcome.peak_rss_bytes = peak
                return

    def _loaded(self, event: dict[str, Any]) -> None:
        self.outcome.load_s, self.outcome.placement = event["load_s"], event["placement"]
        self.say(f"accelerate: loaded in {event['load_s']:.1f} s, placement {event['placement']}")
        drop_page_cache()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def _token(self, event: dict[str, Any]) -> None:
        o = self.outcome
        o.times_s.append(event["t_s"])
        o.tokens.append(event["id"])
        o.read_bytes.append(event["read_bytes"])
        self.say(f"accelerate: token {len(o.tokens)} at {event['t_s']:.1f} s")

    def _next_event(self) -> dict[str, Any] | None:
        """The next JSON line; None (with the status set) when the child ends or time is up."""
        while True:
            self._poll_rss()
            if time.monotonic() > self.deadline:
                elapsed = time.monotonic() - self.started
                self.outcome.status = f"timed out after {elapsed:.0f} s"
                return None
            try:
                line = self.lines.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait()
                self.outcome.status = f"exited with {self.proc.returncode}"
                return None
            if line.startswith(b"{"):
                return dict(json.loads(line))

    def _poll_rss(self) -> None:
        try:
            peak = peak_rss_bytes(self.proc.pid)
        except (OSError, ValueError):
            return  # gone, or a zombie without VmHWM
        self.outcome.peak_rss_bytes = max(self.outcome.peak_rss_bytes or 0, peak)


def _pump(stream: IO[bytes], lines: queue.Queue[bytes | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)
