"""Subword tokenizers (HF tokenizers, the [tokenizers] extra): training offline, exact round trips,
bits per byte normalised by the bytes of the text, loading and the `reformer tokenizer train` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from reformer.cli import main
from reformer.data import IGNORE_INDEX, load_data, load_tokenizer, train_tokenizer

tokenizers = pytest.importorskip("tokenizers")

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "Ünïcödé text: café, naïve, 日本語のテキスト, emoji 😀🚀, Ελληνικά.\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
) * 30


@pytest.fixture(autouse=True)
def _quiet_tokenizers(own_cache, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], vocab_size=300)


def test_training_gives_a_byte_level_bpe_of_the_requested_size(tokenizer):
    assert tokenizer.vocab_size == 300
    assert len(tokenizer.encode(TEXT)) < 0.7 * len(TEXT.encode())  # merges learned
    assert all(i is not None for i in tokenizer.byte_ids)  # every byte has its own token


@pytest.mark.parametrize(
    "text",
    ["", "plain ascii", "never seen: Ω≈ç√∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⚙️", "\x00\x01\t\r\n  trailing  ", "x" * 3000],
    ids=["empty", "ascii", "unseen-unicode", "controls-and-spaces", "long-run"],
)
def test_text_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.hf.decode(ids) == text  # the library's own decoder agrees with the byte table


def test_bytes_that_are_not_utf8_round_trip_through_the_byte_fallback(tokenizer):
    data = b"ok \xff\xfe then \xe6\x97 cut" + "日本".encode() + b"\x80"
    ids = tokenizer.encode_bytes(data)
    assert tokenizer.decode_bytes(ids) == data
    assert sum(int(tokenizer.byte_lengths[i]) for i in ids) == len(data)


def test_token_byte_lengths_add_up_to_the_utf8_bytes_of_the_text(tokenizer):
    # independent of the byte table: the library's decode of each prefix, measured in UTF-8 bytes
    ids = tokenizer.encode(TEXT[:500])
    assert int(tokenizer.byte_lengths[ids].sum()) == len(TEXT[:500].encode("utf-8"))
    for cut in (1, 7, 50, len(ids)):
        prefix = tokenizer.hf.decode(ids[:cut])
        if "\ufffd" not in prefix:  # a cut inside a character decodes to a replacement char
            assert int(tokenizer.byte_lengths[ids[:cut]].sum()) == len(prefix.encode("utf-8"))


def test_bits_per_byte_of_a_tokenized_corpus_are_normalised_by_the_text_bytes(tmp_path, tokenizer):
    folder = tmp_path / "tok"
    tokenizer.save(folder)
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(TEXT)
    held_out = tmp_path / "held_out.txt"
    held_text = "def mul(a, b):\n    return a * b  # naïve 😀\n" * 20
    held_out.write_text(held_text)
    corpus = load_data([text_file], tokenizer=folder, valid=held_out)
    assert corpus.metric == "bits_per_byte" and corpus.vocab_size == 300
    # every held-out token after the first is predicted once: the units are the bytes they spell
    windows = list(corpus.sequential("test", 16, 4))
    units = sum(corpus.units(t) for _, t in windows)
    first_token_bytes = len(tokenizer.decode_bytes(corpus.test[:1]))
    assert units == len(held_text.encode("utf-8")) - first_token_bytes
    # a model that gives every token probability 1/V: bits per byte from the definition
    n_targets = sum(t.numel() for _, t in windows)
    bits_per_byte = n_targets * math.log2(300) / units
    expected = (
        (len(tokenizer.encode(held_text)) - 1)
        * math.log2(300)
        / (len(held_text.encode()) - first_token_bytes)
    )
    assert bits_per_byte == pytest.approx(expected)
    assert corpus.units(torch.tensor([[int(corpus.test[1]), IGNORE_INDEX]])) == len(
        tokenizer.decode_bytes(corpus.test[1:2])
    )


def test_text_corpus_and_token_files_through_the_same_tokenizer_agree(tmp_path, tokenizer):
    folder = tmp_path / "tok"
    tokenizer.save(folder)
    (tmp_path / "a.txt").write_text(TEXT)
    from_text = load_data([tmp_path / "a.txt"], tokenizer=folder)
    np.save(tmp_path / "ids.npy", np.concatenate([from_text.train, from_text.test]))
    from_ids = load_data([tmp_path / "ids.npy"], tokenizer=folder)
    assert np.array_equal(from_ids.train, from_text.train) and from_ids.metric == "bits_per_byte"
    assert from_ids.text_bytes == from_text.text_bytes == len(TEXT.encode())
    with pytest.raises(ValueError, match="differs from the tokenizer's 300"):
        load_data([tmp_path / "ids.npy"], tokenizer=folder, vocab_size=500)


def test_loading_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="is not a tokenizers tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="more than the 256 bytes"):
        train_tokenizer(["abc"], vocab_size=256)


def test_a_tokenizer_that_does_not_spell_text_back_is_refused(tmp_path):
    # a word-level tokenizer with an unknown token: the probe text cannot come back byte for byte
    vocab = {"[UNK]": 0, "def": 1, "f": 2}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "word.json"))
    with pytest.raises(ValueError, match="does not spell text back token by token"):
        load_tokenizer(tmp_path / "word.json")


def test_tokenizer_train_command(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    for k in range(4):
        (tmp_path / "data" / f"f{k}.py").write_text(TEXT + f"# file {k}\n")
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--data", str(tmp_path / "data"), "--vocab-size", "280", "--out", str(out)]
    assert main(args) == 0
    assert "280 tokens" in capsys.readouterr().out
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert load_tokenizer(out).vocab_size == 280
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--vocab-size", "100", "--out", str(out)])
    assert "more than the 256 bytes" in capsys.readouterr().err
