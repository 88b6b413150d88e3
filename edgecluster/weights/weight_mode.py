"""Which form the weights are served in (`--weights`), and the dtypes that follow from it.

`choose_weights` turns what the user asked (`--weights`, `--dtype`, the older
`--storage-dtype`) and what the checkpoint holds into a `WeightsChoice`:

- `--weights MODE` wins. Without it the checkpoint decides: a safetensors checkpoint
  in bf16 is served as bf16, fp32 as fp32 (fp16 as fp32, which holds it exactly); a
  checkpoint converted from a GGUF file whose layers are Q4_0/Q4_1/Q8_0 (or another
  quantized GGUF type) as int8, the closest mode that does not lose more of what the
  file holds (the default model is such a file), on CPUs where int8 is fast (AVX-512;
  elsewhere fp32, which is faster there and exact); `--dtype bfloat16` with a dense
  checkpoint stores it as bf16 (what the flag has always done).
- The compute dtype: bf16 weights compute in bfloat16, the others in float32, unless
  `--dtype` says otherwise. fp32 weights computed in bfloat16 would be rounded when
  loaded (that is `--weights bf16`), so that combination is refused.
- Norms and biases (`storage_dtype`) are stored in the dense modes' dtype, and in the
  compute dtype for int8 and int4.

What a GGUF source holds is read once from the file (its tensor types) and kept in
the converted checkpoint's `edgecluster_source.json`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from edgecluster.weights.gguf_convert import SOURCE_FILE
from edgecluster.weights.quant import QUANTIZED_MODES, WEIGHT_MODES, check_mode

log = logging.getLogger(__name__)

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}
DENSE_MODES = {"float32": "fp32", "bfloat16": "bf16"}
GGUF_DENSE = {"F32": "fp32", "F16": "fp32", "BF16": "bf16"}  # else quantized: int8


@dataclass(frozen=True, kw_only=True)
class WeightsChoice:
    mode: str  # weights.quant mode of every layer matrix and the LM head
    compute_dtype: str  # "float32" | "bfloat16"
    storage_dtype: str  # norms and biases on disk (and the matrices of dense modes)
    reason: str  # why this mode, for the startup log and GET /v1/cluster

    def __post_init__(self) -> None:
        check_mode(self.mode)
        for what, dtype in (("compute", self.compute_dtype), ("storage", self.storage_dtype)):
            if dtype not in DENSE_MODES:
                raise ValueError(f"{what} dtype {dtype!r}: choose float32 or bfloat16")

    @property
    def quantized(self) -> bool:
        return self.mode in QUANTIZED_MODES

    def describe(self) -> str:
        return f"weights {self.mode} ({self.reason}); compute in {self.compute_dtype}"


def check_weights_flags(weights: str | None, dtype: str | None, storage_dtype: str | None) -> None:
    """ValueError for flags that contradict each other (before anything is loaded)."""
    if weights is not None and weights not in WEIGHT_MODES:
        raise ValueError(
            f"--weights {weights!r}: choose one of {', '.join(WEIGHT_MODES)} (default: what "
            "the checkpoint holds; int8 for a GGUF file quantized to 4 or 8 bits)"
        )
    if storage_dtype is not None and weights not in (None, DENSE_MODES.get(storage_dtype)):
        raise ValueError(
            f"--storage-dtype {storage_dtype} contradicts --weights {weights}: "
            "--storage-dtype is the older spelling of --weights fp32|bf16; give only --weights"
        )
    stored = weights or DENSE_MODES.get(storage_dtype or "")
    if stored == "fp32" and dtype == "bfloat16":
        raise ValueError(
            "fp32 weights with --dtype bfloat16 would be rounded to bf16 when loaded: "
            "pass --weights bf16 (half the bytes, the same result), or --dtype float32"
        )


def choose_weights(
    checkpoint_dir: Path,
    *,
    weights: str | None = None,
    dtype: str | None = None,
    storage_dtype: str | None = None,
) -> WeightsChoice:
    """The mode and dtypes to serve `checkpoint_dir` in (see the module doc)."""
    check_weights_flags(weights, dtype, storage_dtype)
    if weights is not None:
        mode, reason = weights, "--weights"
    elif storage_dtype is not None:
        mode, reason = DENSE_MODES[storage_dtype], f"--storage-dtype {storage_dtype}"
    else:
        mode, reason = checkpoint_weights(checkpoint_dir)
        if mode == "fp32" and dtype == "bfloat16":
            mode, reason = "bf16", f"{reason}, stored in bf16 for --dtype bfloat16"
    compute = dtype or ("bfloat16" if mode == "bf16" else "float32")
    storage = DTYPE_NAMES.get(mode, compute)
    return WeightsChoice(mode=mode, compute_dtype=compute, storage_dtype=storage, reason=reason)


def checkpoint_weights(checkpoint_dir: Path) -> tuple[str, str]:
    """(mode, reason): what the checkpoint holds, as a serving mode."""
    source = _gguf_source(checkpoint_dir)
    if source is not None:
        return _gguf_mode(checkpoint_dir, source)
    dtype = _layer_dtype(checkpoint_dir)
    if dtype == "bfloat16":
        return "bf16", "the checkpoint holds bf16"
    if dtype == "float16":
        return "fp32", "the checkpoint holds fp16, which fp32 holds exactly"
    return "fp32", f"the checkpoint holds {dtype or 'float32'}"


def _layer_dtype(checkpoint_dir: Path) -> str | None:
    """The dtype of the first layer's matrices (None: no layer found)."""
    from edgecluster.weights.checkpoint import Checkpoint

    ckpt = Checkpoint(checkpoint_dir)
    try:
        names = [n for n in ckpt.names() if n.endswith("_proj.weight")]
        return str(ckpt.dtype(names[0])).removeprefix("torch.") if names else None
    finally:
        ckpt.close()


def _gguf_source(checkpoint_dir: Path) -> dict[str, object] | None:
    path = checkpoint_dir / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        source = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return source if isinstance(source, dict) and "gguf" in source else None


def _gguf_mode(checkpoint_dir: Path, source: dict[str, object]) -> tuple[str, str]:
    types = source.get("tensor_types")
    if not isinstance(types, dict):
        types = gguf_layer_types(Path(str(source["gguf"])))
        if types is None:
            return "fp32", "converted from a GGUF file that is no longer there: fp32 as converted"
        _remember(checkpoint_dir / SOURCE_FILE, {**source, "tensor_types": types})
    name = Path(str(source["gguf"])).name
    summary = ", ".join(f"{t} x{n}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
    quantized = [t for t in types if t not in GGUF_DENSE]
    if quantized and fast_int8_cpu():
        return "int8", f"{name} holds {summary}: quantized layers are served as int8"
    if quantized:
        return "fp32", (
            f"{name} holds {summary}; int8 would be the default, but this CPU "
            f"({torch.backends.cpu.get_cpu_capability()}) has no fast int8 weight-only "
            "kernel (measured 4x slower than fp32 on AVX2), so fp32: pass --weights int8 "
            "or int4 to save memory instead"
        )
    modes = {GGUF_DENSE[t] for t in types}
    mode = "fp32" if "fp32" in modes or not modes else "bf16"
    return mode, f"{name} holds {summary}"


def fast_int8_cpu() -> bool:
    """Whether torch's CPU int8 weight-only kernel beats fp32 here (AVX-512 and up;
    benchmarks/kernels.py measured it ~4x slower than fp32 on an AVX2 box)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def gguf_layer_types(path: Path) -> dict[str, int] | None:
    """Count of each GGUF tensor type among the layers' 2-D matrices (None: unreadable)."""
    if not path.is_file():
        return None
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except (ImportError, OSError, ValueError) as exc:
        log.warning("cannot read %s to choose the weights mode: %s", path, exc)
        return None
    counts = Counter(
        t.tensor_type.name
        for t in reader.tensors
        if t.name.startswith("blk.") and len(t.shape) == 2
    )
    return dict(counts)


def _remember(path: Path, source: dict[str, object]) -> None:
    """Best effort: rewrite the source file with what was learned (atomically)."""
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(source, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("could not record the GGUF tensor types in %s: %s", path, exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
