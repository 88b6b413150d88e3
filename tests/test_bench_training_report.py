"""The training benchmark's pure arithmetic: smoothing, equal-time loss, bars, kept layers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from training_report import (  # noqa: E402
    add_equal_time,
    bars,
    read_log,
    summarize_run,
    trailing_mean,
    value_at,
)
from training_robustness import kept_layers  # noqa: E402


def _steps(iteration_s: float, losses: list[float], predicted: float) -> list[dict[str, object]]:
    return [
        {
            "step": i + 1,
            "loss": loss,
            "eval_loss": None,
            "iteration_s": iteration_s,
            "predicted_iteration_s": predicted,
            "tokens": 100,
            "tokens_per_s": 100 / iteration_s,
            "elapsed_s": iteration_s * (i + 1),
            "busy": {"a": 0.5},
        }
        for i, loss in enumerate(losses)
    ]


def test_trailing_mean_averages_the_last_window() -> None:
    assert trailing_mean([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert trailing_mean([1.0, 2.0], 5) == [1.0, 1.5]
    with pytest.raises(ValueError, match="window"):
        trailing_mean([1.0], 0)


def test_value_at_interpolates_and_clamps() -> None:
    times, values = [1.0, 3.0, 5.0], [10.0, 6.0, 2.0]
    assert value_at(times, values, 2.0) == pytest.approx(8.0)
    assert value_at(times, values, 4.5) == pytest.approx(3.0)
    assert value_at(times, values, 0.0) == 10.0
    assert value_at(times, values, 9.0) == 2.0


def test_equal_time_reads_every_curve_at_the_shortest_run() -> None:
    losses = [5.0, 4.0, 3.0, 2.0, 1.0]
    logs = {"slow": _steps(2.0, losses, 2.0), "fast": _steps(1.0, losses, 1.5)}
    summaries = {name: summarize_run(steps) for name, steps in logs.items()}
    budget = add_equal_time(summaries, logs)
    assert budget == 5.0  # the fast run's five steps
    assert summaries["fast"]["loss_at_equal_time"] == pytest.approx(1.0)
    # the slow run is at step 2.5 by then: halfway between its 2nd and 3rd losses
    assert summaries["slow"]["loss_at_equal_time"] == pytest.approx(3.5)
    assert summaries["fast"]["prediction_error"] == pytest.approx(0.5)


def test_bars_compare_skippipe_with_gpipe_and_random_skip() -> None:
    def summary(iteration_s: float, loss: float, at_t: float, err: float) -> dict[str, float]:
        return {
            "iteration_s": iteration_s,
            "final_loss": loss,
            "loss_at_equal_time": at_t,
            "prediction_error": err,
        }

    result = bars(
        {
            "gpipe": summary(10.0, 2.0, 3.0, 0.1),
            "random-skip-33": summary(7.0, 2.1, 2.5, -0.2),
            "skippipe-33": summary(6.0, 2.08, 2.2, 0.05),
        }
    )
    assert result["skippipe_vs_gpipe_reduction"]["value"] == pytest.approx(0.4)
    assert result["skippipe_vs_gpipe_reduction"]["met"]
    assert result["skippipe_vs_random_skip_reduction"]["value"] == pytest.approx(1 / 7)
    assert result["final_loss_vs_gpipe_excess"]["met"]  # 4% above gpipe
    assert result["loss_at_equal_time_below_gpipe"]["met"]
    assert result["simulator_error_max"]["value"] == pytest.approx(0.2)
    missing = bars({"gpipe": summary(10.0, 2.0, 3.0, 0.1)})
    assert not missing["skippipe_vs_gpipe_reduction"]["met"]
    assert missing["skippipe_vs_gpipe_reduction"]["value"] is None


def test_read_log_splits_steps_from_done(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"step": 1, "loss": 5.0}\n\n{"event": "done", "steps": 1, "checkpoint": "c/final"}\n'
    )
    steps, done = read_log(path)
    assert [s["step"] for s in steps] == [1]
    assert done is not None and done["checkpoint"] == "c/final"
    assert read_log(tmp_path / "missing.jsonl") == ([], None)


@pytest.mark.parametrize(
    ("num_layers", "fraction", "expected"),
    [
        (10, 1.0, list(range(10))),
        (10, 0.75, [0, 1, 3, 4, 5, 6, 8, 9]),
        (10, 0.5, [0, 2, 5, 7, 9]),
        (8, 0.5, [0, 2, 5, 7]),
        (5, 0.5, [0, 2, 4]),
        (2, 0.5, [0, 1]),
        (1, 0.5, [0]),
    ],
)
def test_kept_layers_are_even_with_first_and_last(
    num_layers: int, fraction: float, expected: list[int]
) -> None:
    keep = kept_layers(num_layers, fraction)
    assert keep == expected
    assert keep == sorted(set(keep))


def test_kept_layers_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="fraction"):
        kept_layers(10, 0.0)
