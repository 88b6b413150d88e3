"""The peer of the streaming benchmark: transformers + Accelerate disk offload, one process.

    python benchmarks/offload_child.py --model DIR --offload-folder DIR --cpu-bytes N
                                       --prompt 1,2,3 --new-tokens 9

Run by `streaming.py` inside an emulated device. It loads the checkpoint the way a
user with too little memory would first try (`device_map="auto"`, `max_memory`,
`offload_folder`), prints one JSON line `{"event": "loaded", ...}`, waits for a line
on stdin (the parent drops the page cache meanwhile), then generates greedily. A
streamer prints one line per new token as it comes, `{"event": "token", "t_s": ..,
"id": .., "read_bytes": ..}` (seconds since generate started; the bytes this
process has read from storage, /proc/self/io), so a parent that gives up still has
the tokens so far; `{"event": "done", "peak_rss_bytes": ..}` ends the output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def read_bytes() -> int:
    """Bytes this process caused to be read from storage so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class TokenClock:
    """A generate() streamer: reports each new token (not the prompt) when it arrives."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        now = time.perf_counter() - self.start
        for token in value.reshape(-1):
            emit({"event": "token", "t_s": now, "id": int(token), "read_bytes": read_bytes()})

    def end(self) -> None:
        pass


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def load(model_dir: str, cpu_bytes: int, offload_folder: str) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.bfloat16,
        device_map="auto",
        max_memory={"cpu": cpu_bytes},
        offload_folder=offload_folder,
    ).eval()


def placement_summary(model: Any) -> dict[str, int]:
    """How many modules of the device map went where ("cpu", "disk")."""
    counts: dict[str, int] = {}
    for where in getattr(model, "hf_device_map", {}).values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return counts


def generate(model: Any, prompt: list[int], new_tokens: int) -> None:
    ids = torch.tensor([prompt])  # [1, T]
    with torch.inference_mode():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=TokenClock(),
            pad_token_id=0,
        )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--offload-folder", required=True)
    parser.add_argument("--cpu-bytes", type=int, required=True, help="max_memory for 'cpu'")
    parser.add_argument("--prompt", required=True, help="token ids, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load(args.model, args.cpu_bytes, args.offload_folder)
    emit(
        {
            "event": "loaded",
            "load_s": time.perf_counter() - started,
            "placement": placement_summary(model),
            "peak_rss_bytes": peak_rss_bytes(),
        }
    )
    sys.stdin.readline()  # the parent drops the page cache, then says go
    generate(model, [int(t) for t in args.prompt.split(",")], args.new_tokens)
    emit({"event": "done", "peak_rss_bytes": peak_rss_bytes()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
