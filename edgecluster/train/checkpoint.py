"""Training checkpoints: Hugging Face model directories plus a training-state directory.

- `save_hf_checkpoint(out_dir, cfg, tensors)`: `config.json` (transformers' own
  config for cfg.model_type, float32), `model.safetensors` (HF names; tied: no
  `lm_head.weight`, as transformers saves it) and the tokenizer files copied from the
  source model. transformers `from_pretrained`, `Checkpoint` and `serve --model DIR`
  read it.
- `save_training_state(dir, ...)`: `training_state.json` (step, data position, JSON
  RNG values, meta) and `optimizer.safetensors` (optimizer tensors by name, RNG
  tensors under `rng/`). `load_training_state(dir)` gives them back bit for bit.

Both write into a temporary sibling directory and rename it into place, so a crash
never leaves a half-written checkpoint under the final name. Keep the training state
in its own directory (e.g. `out_dir / TRAINING_STATE_DIR`, written after the model):
serving globs `*.safetensors` in the model directory. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgecluster.engine.rope import inverse_frequencies
from edgecluster.model_config import ModelConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE, OPTIMIZER_FILE = "training_state.json", "optimizer.safetensors"
TRAINING_STATE_DIR = "training_state"
STATE_FORMAT, STATE_VERSION = "edgecluster-training-state", 1
RNG_PREFIX = "rng/"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "generation_config.json",
)  # fmt: skip
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# Fields of a source config.json that describe the weights, not the tokenizer: cfg wins.
_CFG_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "architectures", "model_type")
_DROPPED_KEYS = ("_name_or_path", "quantization_config", "transformers_version", "torch_dtype")


def hf_config_dict(cfg: ModelConfig, base_config: Mapping[str, Any] | None = None) -> dict:
    """transformers' config dict for `cfg` (float32); token ids etc. kept from base_config."""
    from transformers import AutoConfig

    base = {
        k: v
        for k, v in (base_config or {}).items()
        if k not in _CFG_KEYS and k not in _DROPPED_KEYS
    }
    values: dict[str, Any] = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "dtype": "float32",
    }
    if cfg.model_type != "qwen2":  # qwen2's q/k/v biases are implied by the model type
        values.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    config: dict[str, Any] = AutoConfig.for_model(cfg.model_type, **{**base, **values}).to_dict()
    config.pop("_name_or_path", None)
    _check_round_trip(cfg, ModelConfig.from_hf_dict(config))
    return config


def _check_round_trip(cfg: ModelConfig, written: ModelConfig) -> None:
    """The written config must read back as `cfg` (rope compared by its frequencies)."""
    differ = [
        f.name
        for f in fields(cfg)
        if f.name != "rope_scaling" and getattr(cfg, f.name) != getattr(written, f.name)
    ]
    if not torch.equal(inverse_frequencies(cfg), inverse_frequencies(written)):
        differ.append("rope_scaling")
    if differ:
        raise ValueError(
            f"the model config cannot be written as a transformers {cfg.model_type} config: "
            f"{', '.join(differ)} would read back differently"
        )


def save_hf_checkpoint(
    out_dir: Path | str,
    cfg: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    tokenizer_dir: Path | None,
    base_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write an HF checkpoint of `tensors` (HF names, float32) to `out_dir`, atomically.

    `tokenizer_dir`: copy its tokenizer and generation-config files (None for a byte-level
    model, which has none). `base_config`: the source config.json, whose other fields
    (token ids, ...) are kept. An existing `out_dir` is replaced.
    """
    config = hf_config_dict(cfg, base_config)
    weights = {
        name: t.detach().to("cpu", torch.float32).contiguous()
        for name, t in tensors.items()
        if not (cfg.tie_word_embeddings and name == "lm_head.weight")
    }
    with _staging(Path(out_dir)) as tmp:
        save_file(weights, str(tmp / MODEL_FILE), {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    log.info("wrote checkpoint %s (%d tensors)", out_dir, len(weights))
    return Path(out_dir)


@dataclass(frozen=True, kw_only=True)
class TrainingState:
    """What `--resume` needs besides the weights."""

    step: int
    data_position: int
    rng: dict[str, Any]  # JSON values and torch.Tensor (e.g. a Generator's state)
    optimizer: dict[str, torch.Tensor]  # "exp_avg/<hf name>", ...
    meta: dict[str, Any]


def save_training_state(
    state_dir: Path | str,
    *,
    step: int,
    data_position: int,
    rng: Mapping[str, Any],
    optimizer: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> Path:
    """Write `training_state.json` + `optimizer.safetensors` into `state_dir`, atomically."""
    bad = [name for name in optimizer if name.startswith(RNG_PREFIX)]
    if bad:
        raise ValueError(f"optimizer tensor names may not start with {RNG_PREFIX!r}: {bad[:4]}")
    tensors = {name: t.detach().cpu().contiguous() for name, t in optimizer.items()}
    rng_json = {k: v for k, v in rng.items() if not isinstance(v, torch.Tensor)}
    rng_tensors = {k: v for k, v in rng.items() if isinstance(v, torch.Tensor)}
    tensors.update({RNG_PREFIX + k: v.detach().cpu().contiguous() for k, v in rng_tensors.items()})
    doc = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": int(step),
        "data_position": int(data_position),
        "rng": rng_json,
        "rng_tensors": sorted(rng_tensors),
        "optimizer_tensors": sorted(optimizer),
        "meta": dict(meta),
    }
    try:
        text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"training state rng/meta must be plain JSON values: {exc}") from exc
    with _staging(Path(state_dir)) as tmp:
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(text + "\n")
    return Path(state_dir)


def load_training_state(state_dir: Path | str) -> TrainingState:
    """Read what `save_training_state` wrote; ValueError naming a missing or corrupt file."""
    state_dir = Path(state_dir)
    doc = _read_state_json(state_dir / STATE_FILE)
    path = state_dir / OPTIMIZER_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing; the training state in {state_dir} is incomplete")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is corrupt ({exc}); resume from an earlier checkpoint") from exc
    expected = set(doc["optimizer_tensors"]) | {RNG_PREFIX + k for k in doc["rng_tensors"]}
    if set(tensors) != expected:
        raise ValueError(
            f"{path} does not hold the tensors {state_dir / STATE_FILE} lists; the two files "
            "come from different saves: resume from an earlier checkpoint"
        )
    rng: dict[str, Any] = dict(doc["rng"])
    rng.update({k: tensors[RNG_PREFIX + k] for k in doc["rng_tensors"]})
    return TrainingState(
        step=doc["step"],
        data_position=doc["data_position"],
        rng=rng,
        optimizer={name: tensors[name] for name in doc["optimizer_tensors"]},
        meta=doc["meta"],
    )


def _read_state_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: {path.parent} holds no training state. Point --checkpoint-dir "
            "at a directory `edge-coordinator train` wrote, or start without --resume"
        )
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupt ({exc}); resume from an earlier checkpoint") from exc
    keys = ("step", "data_position", "rng", "rng_tensors", "optimizer_tensors", "meta")
    if (
        not isinstance(doc, dict)
        or doc.get("format") != STATE_FORMAT
        or not all(k in doc for k in keys)
    ):
        raise ValueError(f"{path} is not an edgecluster training state (format {STATE_FORMAT})")
    if doc.get("version") != STATE_VERSION:
        raise ValueError(
            f"{path} has training-state version {doc.get('version')}; this edgecluster "
            f"reads version {STATE_VERSION}"
        )
    return doc


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target`, renamed onto it when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "previous")
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
