"""Finding the checkpoint `--resume` continues from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgecluster.model_config import ModelConfig
from edgecluster.train.checkpoint import TRAINING_STATE_DIR, load_training_state

log = logging.getLogger(__name__)


def find_latest_checkpoint(root: Path, cfg: ModelConfig) -> tuple[Path, int] | None:
    """The checkpoint under `root` with the highest step, and that step; None when there
    is none. A checkpoint of another model is an error (it names the directory)."""
    if not root.is_dir():
        return None
    best: tuple[Path, int] | None = None
    for path in sorted(root.iterdir()):
        if not (path / TRAINING_STATE_DIR / "training_state.json").is_file():
            continue
        state = load_training_state(path / TRAINING_STATE_DIR)
        model = state.meta.get("model")
        if model is not None and model != json.loads(cfg.to_json()):
            raise ValueError(
                f"--resume: {path} holds a checkpoint of another model; point --checkpoint-dir "
                "at this run's checkpoints or drop --resume"
            )
        if best is None or state.step > best[1]:
            best = (path, state.step)
    return best
