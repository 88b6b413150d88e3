"""Corpus loading, tokenizers, the held-out split and deterministic micro-batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from edgecluster.model_config import ModelConfig
from edgecluster.train.data import (
    BatchSampler,
    ByteTokenizer,
    HFTokenizer,
    TokenData,
    load_texts,
    prepare_tokens,
    split_batch,
    tokenizer_for,
)


def _cfg(vocab_size: int) -> ModelConfig:
    hf = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, vocab_size=vocab_size)  # fmt: skip
    return ModelConfig.from_hf_dict(hf.to_dict())


def test_load_texts_reads_json_lines_and_plain_text(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "In the beginning"}\n\n{"text": "Amen."}\n')
    (tmp_path / "b.txt").write_text("Let there be light — and there was light.\n")
    texts = load_texts([tmp_path / "a.jsonl", tmp_path / "b.txt"])
    assert texts == ["In the beginning", "Amen.", "Let there be light — and there was light.\n"]


def test_load_texts_names_the_bad_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 has no string \"text\" field"):
        load_texts([bad])
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not JSON"):
        load_texts([bad])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8"):
        load_texts([latin])
    with pytest.raises(ValueError, match="does not exist"):
        load_texts([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        load_texts([tmp_path / "empty.txt"])


def test_byte_tokenizer_round_trips_utf8() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("Selah — ﬁn")
    assert all(0 <= i < 256 for i in ids) and len(ids) == len("Selah — ﬁn".encode())
    assert tok.decode(ids) == "Selah — ﬁn"


def test_tokenizer_for_picks_bytes_without_tokenizer_files(tmp_path: Path) -> None:
    assert isinstance(tokenizer_for(None, _cfg(256)), ByteTokenizer)
    assert isinstance(tokenizer_for(tmp_path, _cfg(300)), ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size 128 is below 256"):
        tokenizer_for(None, _cfg(128))


def test_tokenizer_for_uses_the_checkpoints_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "in": 1, "the": 2, "beginning": 3, "<unk>": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(str(tmp_path))
    tok = tokenizer_for(tmp_path, _cfg(8))
    assert isinstance(tok, HFTokenizer)
    data = prepare_tokens(["in the beginning", "the"], tok, held_out_fraction=0.0)
    assert data.train.tolist() == [1, 2, 3, 0, 2]  # joined by EOS
    with pytest.raises(ValueError, match="has 5 tokens but the model's vocab_size is 4"):
        tokenizer_for(tmp_path, _cfg(4))


def test_prepare_tokens_holds_out_the_tail() -> None:
    texts = ["ab", "cd", "efghij"]  # joined: "ab\ncd\nefghij", 12 bytes
    data = prepare_tokens(texts, ByteTokenizer(), held_out_fraction=0.25)
    assert bytes(data.train.tolist()) == b"ab\ncd\nefg"
    assert bytes(data.held_out.tolist()) == b"hij"
    assert data.train.dtype == torch.int64
    assert "held out: last 25% of the tokens (3 tokens)" in data.description()
    with pytest.raises(ValueError, match="held_out_fraction"):
        prepare_tokens(texts, ByteTokenizer(), held_out_fraction=1.0)


def _data(n_train: int = 500, n_held: int = 60) -> TokenData:
    return TokenData(
        train=torch.arange(n_train, dtype=torch.int64),
        held_out=torch.arange(10_000, 10_000 + n_held, dtype=torch.int64),
        held_out_fraction=0.1,
    )


def test_batches_are_deterministic_windows() -> None:
    sampler = BatchSampler(_data(), seq_len=16, micro_batch_size=4, seed=3)
    first = sampler.batch(7)
    assert first.shape == (4, 17) and first.dtype == torch.int64
    # windows of consecutive tokens (the corpus here is 0..499)
    assert torch.equal(first[:, 1:] - first[:, :-1], torch.ones(4, 16, dtype=torch.int64))
    again = BatchSampler(_data(), seq_len=16, micro_batch_size=4, seed=3)
    assert torch.equal(again.batch(7), first)  # a pure function of (seed, index)
    assert not torch.equal(sampler.batch(8), first)
    assert not torch.equal(
        BatchSampler(_data(), seq_len=16, micro_batch_size=4, seed=4).batch(7), first
    )
    starts = torch.cat([sampler.batch(i)[:, 0] for i in range(200)])
    assert int(starts.min()) == 0 and int(starts.max()) == 500 - 17  # every window fits
    ids, targets = split_batch(first)
    assert torch.equal(ids[:, 1:], targets[:, :-1])


def test_eval_batches_are_fixed_held_out_windows() -> None:
    sampler = BatchSampler(_data(), seq_len=16, micro_batch_size=2, seed=3)
    batches = sampler.eval_batches(3)
    assert [tuple(b.shape) for b in batches] == [(2, 17)] * 3
    starts = [int(s) for b in batches for s in b[:, 0]]
    assert starts[0] == 10_000 and starts[-1] == 10_000 + 60 - 17
    assert starts == sorted(starts)
    assert all(torch.equal(a, b) for a, b in zip(batches, sampler.eval_batches(3), strict=True))


def test_too_short_corpus_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="fewer than seq_len \\+ 1 = 17"):
        BatchSampler(_data(n_train=16), seq_len=16, micro_batch_size=1, seed=0)
    sampler = BatchSampler(_data(n_held=10), seq_len=16, micro_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="held-out slice has 10 tokens"):
        sampler.eval_batches(1)


def test_json_corpus_through_to_batches(tmp_path: Path) -> None:
    verses = [{"text": f"And God said, Let there be light {i}."} for i in range(40)]
    path = tmp_path / "kjv.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in verses))
    data = prepare_tokens(load_texts([path]), tokenizer_for(None, _cfg(256)))
    sampler = BatchSampler(data, seq_len=32, micro_batch_size=2, seed=1)
    assert b"light" in bytes(data.train.tolist())
    assert sampler.batch(0).max() < 256
    assert len(sampler.eval_batches(2)) == 2
