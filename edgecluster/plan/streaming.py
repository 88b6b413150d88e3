"""TPI-LLM's sliding window of resident weight blocks, chosen purely.

An agent whose blocks do not all fit its room keeps a window of W blocks resident
while a background reader loads the next block ahead of compute. Reads never stall
compute when the compute + allreduce time of the W - 1 blocks ahead covers the read
of one block:  read_s(block) <= (W - 1) * (compute_s + allreduce_s).

The window is the largest that fits the room (more resident never hurts), and at
least 2 (one block computing, one loading). Sizes count conservatively: W blocks
fit when the W largest blocks fit, wherever the window stands. `choose_window`
reports whether the chosen window meets the no-stall condition and the stall it
expects per token (each block is read once per generated token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from edgecluster.errors import PlanError
from edgecluster.units import format_bytes


@dataclass(frozen=True, kw_only=True)
class WindowChoice:
    window_blocks: int  # blocks resident at once
    fits_all: bool  # every block is resident: nothing streams
    expected_stall_s_per_token: float  # disk reads compute waits on, per token
    reason: str  # why this window, in words

    def __post_init__(self) -> None:
        if self.window_blocks < 1:
            raise ValueError(f"window_blocks must be at least 1, got {self.window_blocks}")
        if not self.expected_stall_s_per_token >= 0:
            raise ValueError(
                f"expected_stall_s_per_token must be >= 0, got {self.expected_stall_s_per_token}"
            )


def largest_window(block_bytes: Sequence[int], room_bytes: int) -> int:
    """The largest W whose W largest blocks fit `room_bytes` together (0 if none fits)."""
    used, window = 0, 0
    for size in sorted(block_bytes, reverse=True):
        if used + size > room_bytes:
            break
        used, window = used + size, window + 1
    return window


def expected_stall_s(
    block_bytes: Sequence[int], window_blocks: int, read_bytes_per_s: float, step_s: float
) -> float:
    """Seconds per token compute waits on reads; `step_s` = compute + allreduce of a block."""
    if window_blocks >= len(block_bytes):
        return 0.0
    cover_s = (window_blocks - 1) * step_s
    return sum(max(0.0, size / read_bytes_per_s - cover_s) for size in block_bytes)


def choose_window(
    *,
    block_bytes: Sequence[int],
    room_bytes: int,
    read_bytes_per_s: float,
    compute_s_per_block: float,
    allreduce_s: float,
    override: int | None = None,
    agent: str = "the agent",
) -> WindowChoice:
    """The window for blocks of `block_bytes` in `room_bytes`; PlanError if none works.

    `override` forces the window (at least 2, and it must fit the room); one larger
    than the number of blocks means all of them. `agent` names the agent in messages.
    """
    _check_inputs(block_bytes, read_bytes_per_s, compute_s_per_block, allreduce_s)
    num_blocks, largest = len(block_bytes), max(block_bytes)
    fit = largest_window(block_bytes, room_bytes)
    if override is None and fit >= num_blocks:
        total = format_bytes(sum(block_bytes))
        reason = (
            f"all {num_blocks} blocks ({total}) fit {format_bytes(room_bytes)}: nothing streams"
        )
        return WindowChoice(
            window_blocks=num_blocks, fits_all=True, expected_stall_s_per_token=0.0, reason=reason
        )
    if override is not None:
        window = _checked_override(override, fit, num_blocks, block_bytes, room_bytes, agent)
    elif fit < 2:
        raise PlanError(window_too_small_message(agent, room_bytes, largest))
    else:
        window = fit
    step_s = compute_s_per_block + allreduce_s
    stall = expected_stall_s(block_bytes, window, read_bytes_per_s, step_s)
    return WindowChoice(
        window_blocks=window,
        fits_all=window >= num_blocks,
        expected_stall_s_per_token=stall,
        reason=_reason(block_bytes, window, room_bytes, largest / read_bytes_per_s, step_s, stall),
    )


def window_too_small_message(agent: str, room_bytes: int, largest_block_bytes: int) -> str:
    return (
        f"{agent} cannot stream its weights: it has {format_bytes(room_bytes)} of room for "
        f"weights, and streaming keeps 2 of its largest block ({format_bytes(largest_block_bytes)} "
        f"each, {format_bytes(2 * largest_block_bytes)}) resident beside its KV cache. "
        f"To make room: {MEMORY_KNOBS}."
    )


MEMORY_KNOBS = (
    "raise the agent's --memory-limit; add agents so each shard shrinks; store weights in "
    "fewer bytes (serve --weights int8, or int4 at half that); keep the KV cache in bf16 "
    "(serve --kv-dtype bfloat16); reserve fewer KV tokens (serve --kv-budget) or shorten "
    "the context (serve --max-context)"
)


def _checked_override(
    override: int,
    fit: int,
    num_blocks: int,
    block_bytes: Sequence[int],
    room_bytes: int,
    agent: str,
) -> int:
    window = min(override, num_blocks)
    if override < 2:
        raise PlanError(f"window of {override} blocks for {agent}: streaming needs at least 2")
    if window > fit:
        need = sum(sorted(block_bytes, reverse=True)[:window])
        raise PlanError(
            f"window of {override} blocks for {agent} needs up to {format_bytes(need)} but it has "
            f"{format_bytes(room_bytes)} of room for weights; the largest window that fits is "
            f"{fit} blocks"
        )
    return window


def _reason(
    block_bytes: Sequence[int],
    window: int,
    room_bytes: int,
    slowest_read_s: float,
    step_s: float,
    stall_s: float,
) -> str:
    resident = format_bytes(sum(sorted(block_bytes, reverse=True)[:window]))
    head = (
        f"{window} of {len(block_bytes)} blocks resident (up to {resident} "
        f"of {format_bytes(room_bytes)})"
    )
    if window >= len(block_bytes):
        return f"{head}: nothing streams"
    cover_ms = (window - 1) * step_s * 1e3
    if stall_s == 0:
        return (
            f"{head}; reads keep up: {window - 1} blocks of compute + allreduce "
            f"({cover_ms:.1f} ms) cover the slowest read ({slowest_read_s * 1e3:.1f} ms)"
        )
    return (
        f"{head}; reads stall about {stall_s * 1e3:.1f} ms per token: the slowest read "
        f"({slowest_read_s * 1e3:.1f} ms) outlasts {window - 1} blocks of compute + allreduce "
        f"({cover_ms:.1f} ms); more memory, a faster disk or more agents would remove it"
    )


def _check_inputs(
    block_bytes: Sequence[int], read_bytes_per_s: float, compute_s: float, allreduce_s: float
) -> None:
    if not block_bytes:
        raise ValueError("block_bytes is empty: an agent with no blocks needs no window")
    if any(size < 0 for size in block_bytes):
        raise ValueError(f"block sizes must be >= 0 bytes, got {list(block_bytes)}")
    if not (math.isfinite(read_bytes_per_s) and read_bytes_per_s > 0):
        raise ValueError(f"read_bytes_per_s must be positive, got {read_bytes_per_s}")
    for name, value in (("compute_s_per_block", compute_s), ("allreduce_s", allreduce_s)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value}")
