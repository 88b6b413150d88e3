"""Convert a GGUF file into a Hugging Face safetensors checkpoint directory.

transformers reads GGUF (`from_pretrained(..., gguf_file=...)`) and dequantizes it to
float32; this module writes what it read as an ordinary checkpoint: config.json,
model.safetensors, generation_config.json and the tokenizer files. Weights stay float32,
so the conversion adds no rounding of its own to the quantized values. The output is
what every other part of edgecluster reads, and what the parity tests load into
transformers as the reference.

`save_pretrained` refuses GGUF-quantized models, hence the hand-written save: the
state dict goes to safetensors (without `lm_head.weight` when the embeddings are
tied, as transformers itself saves them), the config without its
`quantization_config`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)

SOURCE_FILE = "edgecluster_source.json"  # what the directory was converted from


def convert_gguf(gguf_path: Path, out_dir: Path, source_info: dict[str, Any]) -> None:
    """Write the checkpoint converted from `gguf_path` into the existing `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info("reading and dequantizing %s", gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tied = bool(model.config.tie_word_embeddings)
    log.info("writing safetensors checkpoint to %s", out_dir)
    save_file(_state_dict(model, tied), str(out_dir / "model.safetensors"), {"format": "pt"})
    config = _config_dict(model)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / SOURCE_FILE).write_text(json.dumps(source_info, indent=2, sort_keys=True) + "\n")
    log.info("converted %s in %.1f s", gguf_path.name, time.monotonic() - started)


def _state_dict(model: Any, tied: bool) -> dict[str, torch.Tensor]:
    return {
        name: t.detach().contiguous()
        for name, t in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }


def _config_dict(model: Any) -> dict[str, Any]:
    config: dict[str, Any] = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    return config
