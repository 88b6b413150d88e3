"""choose_window: TPI-LLM's sliding window, its no-stall condition and its errors."""

from __future__ import annotations

import pytest

from edgecluster.errors import PlanError
from edgecluster.plan.streaming import WindowChoice, choose_window, largest_window

MiB = 1024**2
ATTN, MLP = 10 * MiB, 30 * MiB
BLOCKS = [ATTN, MLP] * 8  # 8 layers: 320 MiB in all
READ = 100 * MiB  # bytes per second: an MLP block reads in 0.3 s


def choose(
    room: int,
    *,
    compute_s: float = 0.01,
    allreduce_s: float = 0.0,
    override: int | None = None,
    agent: str = "the agent",
) -> WindowChoice:
    return choose_window(
        block_bytes=BLOCKS,
        room_bytes=room,
        read_bytes_per_s=READ,
        compute_s_per_block=compute_s,
        allreduce_s=allreduce_s,
        override=override,
        agent=agent,
    )


def test_everything_fits() -> None:
    choice = choose(320 * MiB)
    assert choice == WindowChoice(
        window_blocks=16, fits_all=True, expected_stall_s_per_token=0.0, reason=choice.reason
    )
    assert "nothing streams" in choice.reason


@pytest.mark.parametrize(
    ("room", "window"),
    [(60 * MiB, 2), (89 * MiB, 2), (90 * MiB, 3), (240 * MiB, 8), (250 * MiB, 9), (319 * MiB, 15)],
)
def test_window_is_the_largest_that_fits_wherever_it_stands(room: int, window: int) -> None:
    choice = choose(room)
    assert choice.window_blocks == window == largest_window(BLOCKS, room)
    assert not choice.fits_all


def test_stall_is_reads_not_covered_by_the_blocks_ahead() -> None:
    # window 3: 2 blocks of 0.05 s cover 0.1 s of each read; attn reads 0.1 s, MLP 0.3 s
    choice = choose(90 * MiB, compute_s=0.04, allreduce_s=0.01)
    assert choice.window_blocks == 3
    assert choice.expected_stall_s_per_token == pytest.approx(8 * 0.2)
    assert "stall" in choice.reason and "more memory" in choice.reason


def test_no_stall_when_compute_and_allreduce_cover_a_read() -> None:
    choice = choose(90 * MiB, compute_s=0.1, allreduce_s=0.05)
    assert choice.expected_stall_s_per_token == 0.0
    assert "reads keep up" in choice.reason


def test_override_forces_the_window() -> None:
    assert choose(320 * MiB, override=4).window_blocks == 4
    assert not choose(320 * MiB, override=4).fits_all
    assert choose(320 * MiB, override=99).fits_all  # more than there are: all of them


@pytest.mark.parametrize(("override", "match"), [(1, "at least 2"), (4, "largest window")])
def test_bad_override_names_the_sizes(override: int, match: str) -> None:
    with pytest.raises(PlanError, match=match) as err:
        choose(90 * MiB, override=override)
    if override == 4:
        assert "90.0 MiB of room" in str(err.value) and "3 blocks" in str(err.value)


def test_room_under_two_blocks_is_a_plan_error_with_the_fix() -> None:
    with pytest.raises(PlanError) as err:
        choose(59 * MiB, agent="agent pi (node-7)")
    message = str(err.value)
    assert "agent pi (node-7)" in message
    assert "59.0 MiB of room" in message and "30.0 MiB each" in message
    assert "--memory-limit" in message and "add agents" in message and "bf16" in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_bytes": []}, "block_bytes is empty"),
        ({"block_bytes": [-1, 5]}, ">= 0 bytes"),
        ({"read_bytes_per_s": 0.0}, "read_bytes_per_s"),
        ({"compute_s_per_block": -1.0}, "compute_s_per_block"),
        ({"allreduce_s": float("nan")}, "allreduce_s"),
    ],
)
def test_inputs_are_validated(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "block_bytes": BLOCKS,
        "room_bytes": 100 * MiB,
        "read_bytes_per_s": READ,
        "compute_s_per_block": 0.01,
        "allreduce_s": 0.0,
    }
    with pytest.raises(ValueError, match=match):
        choose_window(**(args | kwargs))  # type: ignore[arg-type]


def test_window_choice_validates() -> None:
    with pytest.raises(ValueError, match="window_blocks"):
        WindowChoice(window_blocks=0, fits_all=False, expected_stall_s_per_token=0.0, reason="")
