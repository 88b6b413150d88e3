"""`edge-coordinator train`'s options, validated where they are made."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgecluster.plan.pipeline import PipelineOptions


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    model: str
    data: tuple[Path, ...] = ()
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    steps: int = 100
    lr: float = 3e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd
    eval_every: int = 10  # 0: only at the end
    eval_batches: int = 4
    held_out_fraction: float = 0.05
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0  # 0: only at the end
    resume: bool = False
    log_json: Path | None = None
    cluster_file: Path | None = None
    dry_run: bool = False
    progress: bool = True  # a live bar on stderr

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("--eval-every and --checkpoint-every must be >= 0 (0: at the end)")
        if self.eval_batches < 1:
            raise ValueError(f"eval batches must be >= 1, got {self.eval_batches}")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"held-out fraction must be in (0, 1), got {self.held_out_fraction}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir (where the run's checkpoints are)")
        if not self.dry_run and not self.data:
            raise ValueError("--data is required: one or more text or JSON-lines files")
        for path in self.data:
            if not path.is_file():
                raise ValueError(f"--data {path}: no such file")
