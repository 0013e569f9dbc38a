"""Token-id files (.npy / nanoGPT .bin), the format registry and its detection by file name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reformer.data import FORMATS, IGNORE_INDEX, detect_format, load_data, load_tokens

pytestmark = pytest.mark.usefixtures("own_cache")


def write_bin(path, ids, dtype):
    path.write_bytes(np.asarray(ids, dtype=dtype).tobytes())
    return path


def test_bin_file_is_read_as_little_endian_ids_and_split_without_loss(tmp_path):
    ids = np.arange(1000) * 37 % 50257
    path = write_bin(tmp_path / "train.bin", ids, "<u2")
    corpus = load_data([path], dtype="uint16", vocab_size=50257)
    assert corpus.vocab_size == 50257 and corpus.metric == "bits_per_token"
    assert np.array_equal(np.concatenate([corpus.train, corpus.test]), ids)  # nothing dropped
    assert len(corpus.test) == 50  # the last 5%
    # the bytes as written by hand, little-endian, without numpy
    raw = path.read_bytes()
    assert [raw[2 * i] + 256 * raw[2 * i + 1] for i in range(5)] == ids[:5].tolist()


def test_uint32_bin_and_npy_give_the_same_ids(tmp_path):
    ids = np.array([0, 70000, 5, 99999, 3] * 40)
    bin_path = write_bin(tmp_path / "a.bin", ids, "<u4")
    np.save(tmp_path / "a.npy", ids.astype(np.int64))
    from_bin = load_tokens([bin_path], dtype="uint32", vocab_size=100000)
    from_npy = load_tokens([tmp_path / "a.npy"], vocab_size=100000)
    assert np.array_equal(from_bin.train, from_npy.train) and np.array_equal(from_bin.test, from_npy.test)


def test_windows_over_token_files_are_the_ids(tmp_path):
    ids = np.arange(300)
    path = write_bin(tmp_path / "t.bin", ids, "<u2")
    corpus = load_tokens([path], dtype="uint16", vocab_size=300)
    inputs, targets = corpus.sample("train", 4, 16, torch.Generator().manual_seed(0))
    for row_in, row_t in zip(inputs.tolist(), targets.tolist(), strict=True):
        assert row_in == list(range(row_in[0], row_in[0] + 16)) and row_t == [i + 1 for i in row_in]
    seen = torch.cat([t.flatten() for _, t in corpus.sequential("test", 4, 2)]).tolist()
    assert seen == corpus.test[1:].tolist()


def test_held_out_file_and_several_files(tmp_path):
    train = write_bin(tmp_path / "train.bin", np.arange(500) % 100, "<u2")
    val = write_bin(tmp_path / "val.bin", np.arange(50) % 100, "<u2")
    corpus = load_data([train], dtype="uint16", vocab_size=100, valid=val)
    assert len(corpus.train) == 500 and np.array_equal(corpus.test, np.arange(50) % 100)
    with pytest.raises(ValueError, match="also a --data file"):
        load_data([tmp_path], dtype="uint16", vocab_size=100, valid=val)
    folder = tmp_path / "shards"
    folder.mkdir()
    total = 0
    for k in range(6):
        write_bin(folder / f"shard{k}.bin", np.full(100 + k, k), "<u2")
        total += 100 + k
    joined = load_data([folder], dtype="uint16", vocab_size=100)
    assert len(joined.train) + len(joined.test) == total and len(joined.test) >= 100


@pytest.mark.parametrize(
    "name, content, options, message",
    [
        ("t.bin", b"\x01\x00\x02\x00", {"vocab_size": 10}, "--dtype uint16"),
        ("t.bin", b"\x01\x00\x02", {"dtype": "uint16", "vocab_size": 10}, "not a whole number of uint16"),
        (
            "t.bin",
            b"\x01\x00\x02\x00\x03\x00",
            {"dtype": "uint32", "vocab_size": 10},
            "truncated or its dtype",
        ),
        ("t.bin", b"", {"dtype": "uint16", "vocab_size": 10}, "is empty"),
        (
            "t.bin",
            b"\x01\x00",
            {"dtype": "uint8", "vocab_size": 10},
            r"\(for .*t.bin\) must be one of uint16, uint32",
        ),
        ("t.bin", b"\x01\x00\x0b\x00", {"dtype": "uint16", "vocab_size": 10}, "id 11 at position 1"),
        ("t.bin", b"\x01\x00", {"dtype": "uint16"}, "need --vocab-size"),
        ("t.npy", b"\x93NUMPY garbage", {"vocab_size": 10}, "not a readable .npy"),
    ],
    ids=[
        "bin-without-dtype",
        "odd-uint16",
        "uint32-of-6-bytes",
        "empty",
        "uint8",
        "out-of-range",
        "no-vocab-size",
        "corrupt-npy",
    ],
)
def test_bad_token_files_are_rejected_naming_the_file(tmp_path, name, content, options, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        load_tokens([path], **options)
    assert str(path) in str(err.value) or "--" in message


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 5), dtype=np.int32), r"shape \(4, 5\)"),
        (np.linspace(0, 1, 10), "float64 values"),
        (np.array([1, -2, 3], dtype=np.int16), "id -2 at position 1"),
        (np.array([], dtype=np.int64), "holds no ids"),
        (np.array([True, False]), "bool values"),
    ],
    ids=["2-d", "float", "negative", "empty", "bool"],
)
def test_bad_npy_arrays_are_rejected(tmp_path, array, message):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(ValueError, match=message):
        load_tokens([tmp_path / "x.npy"], vocab_size=10)


def test_out_of_range_ids_far_into_a_large_file_are_found(tmp_path):
    ids = np.zeros(20_000_000, dtype=np.uint16)  # beyond one check block
    ids[17_000_001] = 300
    path = write_bin(tmp_path / "big.bin", ids, "<u2")
    with pytest.raises(ValueError, match="id 300 at position 17,000,001"):
        load_tokens([path], dtype="uint16", vocab_size=300)


def test_dtype_is_refused_for_npy_and_other_formats(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(10))
    with pytest.raises(ValueError, match="--dtype is for raw .bin"):
        load_tokens([tmp_path / "x.npy"], dtype="uint16", vocab_size=10)
    (tmp_path / "a.txt").write_text("hello world " * 50)
    with pytest.raises(ValueError, match="--dtype does not apply to the bytes format"):
        load_data([tmp_path / "a.txt"], dtype="uint16")


def test_formats_are_detected_from_file_names(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "g.fa.gz").write_bytes(b"")
    (tmp_path / "t.bin").write_bytes(b"")
    (tmp_path / "p.JPG").write_bytes(b"")
    assert detect_format(None) == "bytes" and detect_format(None, tokenizer_given=True) == "tokenizer"
    assert detect_format([tmp_path / "a.txt"]) == "bytes"
    assert detect_format([tmp_path / "a.txt"], tokenizer_given=True) == "tokenizer"
    assert detect_format([tmp_path / "g.fa.gz"]) == "fasta"
    assert detect_format([tmp_path / "t.bin"]) == "tokens"
    assert detect_format([tmp_path / "p.JPG"]) == "images"
    with pytest.raises(ValueError, match="mixes formats"):
        detect_format([tmp_path])
    assert set(FORMATS) == {"bytes", "tokens", "tokenizer", "fasta", "images"}


def test_a_nanogpt_bin_is_never_read_as_bytes_by_accident(tmp_path):
    path = write_bin(tmp_path / "train.bin", np.arange(100), "<u2")
    with pytest.raises(ValueError, match="pass --dtype uint16"):
        load_data([path])
    assert len(load_data([path], format="bytes").train) + len(load_data([path], format="bytes").test) == 200


def test_unknown_format_and_default_without_data(tmp_path):
    with pytest.raises(ValueError, match="must be one of"):
        load_data(format="parquet")
    with pytest.raises(ValueError, match="no default corpus"):
        load_data(format="tokens", vocab_size=10)


def test_token_prompts_are_ids(tmp_path):
    path = write_bin(tmp_path / "t.bin", np.arange(100), "<u2")
    corpus = load_tokens([path], dtype="uint16", vocab_size=100)
    assert corpus.encode(" 5 17 99 ").tolist() == [5, 17, 99] and corpus.decode([5, 17]) == "5 17"
    with pytest.raises(ValueError, match="token ids separated by spaces"):
        corpus.encode("hello")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        corpus.encode("100")
    assert corpus.units(torch.tensor([[1, IGNORE_INDEX, 3]])) == 2
