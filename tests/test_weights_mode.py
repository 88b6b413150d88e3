"""`serve --weights`: the mode a checkpoint is served in by default, the compute dtype
it implies, and flags that contradict each other refused with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coordinator.cli import main
from edgecluster.config import CoordinatorConfig
from edgecluster.weights import weight_mode
from edgecluster.weights.gguf_convert import SOURCE_FILE
from edgecluster.weights.weight_mode import choose_weights


def _checkpoint(path: Path, dtype: torch.dtype, source: dict | None = None) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    weights = {"model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4, dtype=dtype)}
    save_file(weights, str(path / "model.safetensors"))
    if source is not None:
        (path / SOURCE_FILE).write_text(json.dumps(source))
    return path


@pytest.mark.parametrize(
    ("dtype", "mode", "compute"),
    [
        (torch.float32, "fp32", "float32"),
        (torch.bfloat16, "bf16", "bfloat16"),
        (torch.float16, "fp32", "float32"),
    ],
)
def test_a_checkpoint_is_served_as_it_is_stored(
    tmp_path: Path, dtype: torch.dtype, mode: str, compute: str
) -> None:
    choice = choose_weights(_checkpoint(tmp_path / "ckpt", dtype))
    assert (choice.mode, choice.compute_dtype, choice.storage_dtype) == (mode, compute, compute)
    assert "checkpoint holds" in choice.reason


@pytest.mark.parametrize("fast_int8", [True, False])
def test_a_quantized_gguf_source_is_served_as_int8_where_int8_is_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_int8: bool
) -> None:
    """int8 where the CPU has a fast int8 kernel (AVX-512); elsewhere fp32, which is
    faster there and exact, and the reason says how to ask for int8 anyway."""
    monkeypatch.setattr(weight_mode, "fast_int8_cpu", lambda: fast_int8)
    source = {"gguf": str(tmp_path / "gone.Q4_1.gguf"), "tensor_types": {"Q4_1": 210}}
    choice = choose_weights(_checkpoint(tmp_path / "ckpt", torch.float32, source))
    expected = "int8" if fast_int8 else "fp32"
    assert (choice.mode, choice.compute_dtype, choice.storage_dtype) == (
        expected,
        "float32",
        "float32",
    )
    assert "Q4_1" in choice.reason and expected in choice.describe()
    if not fast_int8:
        assert "--weights int8" in choice.reason
    f32 = {"gguf": str(tmp_path / "x.gguf"), "tensor_types": {"F32": 7}}
    assert choose_weights(_checkpoint(tmp_path / "f32", torch.float32, f32)).mode == "fp32"


def test_flags_choose_the_mode_and_the_compute_dtype(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt", torch.float32)
    int4 = choose_weights(ckpt, weights="int4", dtype="bfloat16")
    assert (int4.mode, int4.compute_dtype, int4.storage_dtype) == ("int4", "bfloat16", "bfloat16")
    assert choose_weights(ckpt, weights="bf16").compute_dtype == "bfloat16"
    assert choose_weights(ckpt, weights="bf16", dtype="float32").compute_dtype == "float32"
    # the older flags keep their meaning
    assert choose_weights(ckpt, dtype="bfloat16").mode == "bf16"
    assert choose_weights(ckpt, storage_dtype="bfloat16").mode == "bf16"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"weights": "int3"}, "--weights 'int3': choose one of fp32, bf16, int8, int4"),
        ({"weights": "fp32", "dtype": "bfloat16"}, "pass --weights bf16"),
        ({"storage_dtype": "float32", "dtype": "bfloat16"}, "pass --weights bf16"),
        ({"weights": "int8", "storage_dtype": "float32"}, "give only --weights"),
    ],
)
def test_contradictions_are_refused_with_the_fix(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        CoordinatorConfig(token="t", **kwargs)


def test_a_bad_weights_flag_is_a_cli_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--token", "t", "--weights", "int3", "--log-level", "ERROR"]) == 2
    err = capsys.readouterr().err
    assert "--weights 'int3': choose one of fp32, bf16, int8, int4" in err
    assert main(["serve", "--token", "t", "--weights", "fp32", "--dtype", "bfloat16"]) == 2
    assert "--weights bf16" in capsys.readouterr().err
