"""transformers' `generate` timed as the peer of an edgecluster decode (`inference.py`).

In this process, greedy, on the same prompt ids: TTFT is `max_new_tokens=1`; the
decode rate is (tokens - 1) / (time for `new_tokens` tokens with `min_new_tokens`
set, minus TTFT). It is timed at each of several torch thread counts: on a loaded
machine torch's default of one thread per core can be several times slower than
one thread, and a ratio against a crippled peer would flatter us, so the caller
takes the fastest count per figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from decode_timing import Run, timed_runs


def load_hf(model_dir: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()


def hf_generate_s(model: Any, ids: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    """Seconds for greedy `generate` of exactly `new_tokens` tokens, and the count made."""
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=model.generation_config.eos_token_id,
        )  # fmt: skip
    return time.perf_counter() - start, out.shape[1] - ids.shape[1]


def hf_run(model: Any, ids: torch.Tensor, new_tokens: int) -> Run:
    ttft_s, _ = hf_generate_s(model, ids, 1)
    total_s, made = hf_generate_s(model, ids, new_tokens)
    return Run(ttft_s=ttft_s, decode_s=total_s - ttft_s, num_tokens=made)


def measure_hf(
    model_dir: Path,
    dtype: torch.dtype,
    prompt: list[int],
    *,
    new_tokens: int,
    threads: Sequence[int],
    num_runs: int,
    say: Callable[[str], None],
) -> dict[int, list[Run]]:
    """Runs at each of `threads` torch thread counts (the process's count is restored)."""
    model = load_hf(model_dir, dtype)
    ids = torch.tensor([prompt])  # [1, T]
    before = torch.get_num_threads()
    by_threads = {}
    try:
        for count in threads:
            torch.set_num_threads(count)
            say(f"transformers {str(dtype).removeprefix('torch.')}, {count} torch threads; timing")
            by_threads[count] = timed_runs(lambda: hf_run(model, ids, new_tokens), num_runs, say)
    finally:
        torch.set_num_threads(before)
    return by_threads
