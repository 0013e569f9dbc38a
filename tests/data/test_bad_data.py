"""Bad data as a user meets it, in every format ``reformer train --data`` reads: byte corpora, classify
JSON lines (and class folders), seq2seq pairs JSON lines. Each is refused with the file (and line) and
the fix; a huge line is refused after reading a bounded prefix (checked with tracemalloc, and on a
sparse 10 GB file); a corpus file deleted mid-run does not stop the run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc

import pytest

from reformer.cli import main
from reformer.data import load_corpus
from reformer.tasks.labelled import DataError, load_labelled
from reformer.tasks.seq2seq import read_pairs
from reformer.train import TrainingError, checkpoint_dirs
from tests.conftest import SMALL_FLAGS

TEN_GB = 10 * 2**30


pytestmark = pytest.mark.usefixtures("own_cache")


def _sparse(path, size, head=b""):
    """A file of ``size`` bytes taking no disk space: ``head``, then zero bytes (no newline)."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


# ---- byte corpora ----------------------------------------------------------------------------------


def test_folders_of_empty_files_are_refused_naming_them(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "empty" / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"--data: the training files \(.*empty/.\.txt\) are all empty"):
        load_corpus([tmp_path / "empty"])
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_bytes(b"")  # held out (by the hash of its name)
    (tmp_path / "mixed" / "b.txt").write_text("some text " * 50)
    with pytest.raises(ValueError, match=r"the held-out files \(.*a\.txt\) are all empty; remove"):
        load_corpus([tmp_path / "mixed"])


def test_a_corpus_file_deleted_mid_run_does_not_stop_it_and_resume_names_it(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    run = tmp_path / "run"
    env = {**os.environ, "REFORMER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "reformer", "train", "--data", str(corpus), "--out", str(run), "--steps", "10",
         "--save-every", "2", "--eval-every", "20", "--eval-batches", "1", *SMALL_FLAGS],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not checkpoint_dirs(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    corpus.unlink()  # the run reads a memory map of it, which outlives the name
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert checkpoint_dirs(run)[-1].name == "step-00000010"
    done = subprocess.run(
        [sys.executable, "-m", "reformer", "train", "--out", str(run), "--resume", "--steps", "12"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2  # a usage error, before anything is written
    assert f"error: --data path {corpus} does not exist" in done.stderr and "Traceback" not in done.stderr


# ---- classify: JSON lines and class folders --------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "fine", "label": "a"}\n{"text": "caf\xc3", "label": "b"}\n',
         r"t\.jsonl:2: not UTF-8 text \(byte 0xc3 at column 14\); save the file as UTF-8"),
        (b'{"text": "fine", "label": "a"}\n\n{"text": "x", "label": "b",}\n',
         r"t\.jsonl:3: not valid JSON \(.* at column 28\); each line must be one object like"),
        (b"", r"t\.jsonl holds no examples"),
        (b"\n\n", r"t\.jsonl holds no examples"),
        (b'{"text": "fine", "label": "a"}\n{"text": "' + b"x" * 500 + b'", "label": "b"}\n',
         r"t\.jsonl:2: the text is 500 bytes, over the model's max_seq_len 16; pass --truncate"),
    ],
)  # fmt: skip
def test_classify_lines_name_the_file_line_and_fix(tmp_path, content, message):
    path = tmp_path / "t.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_labelled(path, max_len=16)


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert load_labelled(path, max_len=16).labels == ["x", "y"]


def test_a_huge_line_is_refused_after_a_bounded_read(tmp_path):
    path = tmp_path / "huge.jsonl"
    line = b'{"text": "' + b"x" * 20_000_000 + b'", "label": "b"}\n'
    path.write_bytes(b'{"text": "fine", "label": "a"}\n' + line)
    tracemalloc.start()
    try:
        with pytest.raises(
            DataError, match=r"huge\.jsonl:2: the line is longer than 65,920 bytes.*--seq-len"
        ):
            load_labelled(path, max_len=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # not the 20 MB line
    # A 10 GB file of one line (sparse: no disk space), refused as fast.
    _sparse(tmp_path / "ten.jsonl", TEN_GB, b'{"text": "')
    start = time.monotonic()
    with pytest.raises(DataError, match=r"ten\.jsonl:1: the line is longer than"):
        load_labelled(tmp_path / "ten.jsonl", max_len=64)
    with pytest.raises(DataError, match=r"ten\.jsonl:1: the line is longer than 268,435,456 bytes.*shorten"):
        load_labelled(tmp_path / "ten.jsonl", max_len=64, truncate=True)
    assert time.monotonic() - start < 30


def test_class_folders_refuse_invalid_utf8_and_huge_files_by_name(tmp_path):
    for label in ("neg", "pos"):
        (tmp_path / "d" / label).mkdir(parents=True)
        (tmp_path / "d" / label / "0.txt").write_text("fine")
    (tmp_path / "d" / "pos" / "1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"pos/1\.txt is not UTF-8 text"):
        load_labelled(tmp_path / "d", max_len=16)
    (tmp_path / "d" / "pos" / "1.txt").unlink()
    _sparse(tmp_path / "d" / "pos" / "2.txt", TEN_GB)
    with pytest.raises(DataError, match=r"pos/2\.txt has 10,737,418,240 bytes, over the 268,435,456"):
        load_labelled(tmp_path / "d", max_len=16, truncate=True)


def test_classify_cli_names_the_bad_line(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_bytes(
        b'{"text": "good", "label": "a"}\n{"text": "\xff", "label": "b"}\n'
    )
    (tmp_path / "valid.jsonl").write_text('{"text": "good", "label": "a"}\n')
    argv = ["train", "--task", "classify", "--data", str(tmp_path / "train.jsonl"), "--valid",
            str(tmp_path / "valid.jsonl"), "--out", str(tmp_path / "run"), *SMALL_FLAGS]  # fmt: skip
    assert main(argv) == 1
    assert "train.jsonl:2: not UTF-8 text (byte 0xff at column 11)" in capsys.readouterr().err


# ---- seq2seq pairs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"source": "ab", "target": "ba"}\n{"source": "caf\xe9", "target": "x"}\n',
         r"p\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"),
        (b'{"source": "ab", "target": "ba"}\n{"source": "ab" "target": "ba"}\n',
         r"p\.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 17\)"),
        (b'{"source": "ab", "target": "ba"}\n["ab", "ba"]\n',
         r"p\.jsonl:2 is not a JSON object with string fields source and target"),
        (b'{"source": "ab", "target": 7}\n', r"p\.jsonl:1 is not a JSON object"),
        (b"", r"--data .*p\.jsonl holds 0 pair\(s\); give at least 2"),
    ],
)  # fmt: skip
def test_pairs_lines_name_the_file_line_and_fix(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(TrainingError, match=message):
        read_pairs([str(path)], 16)


def test_pairs_refuse_a_huge_line_and_a_folder(tmp_path):
    _sparse(tmp_path / "ten.jsonl", TEN_GB, b'{"source": "')
    start = time.monotonic()
    with pytest.raises(TrainingError, match=r"ten\.jsonl:1: the line is longer than 65,728 bytes.*--seq-len"):
        read_pairs([str(tmp_path / "ten.jsonl")], 16)
    assert time.monotonic() - start < 30
    with pytest.raises(TrainingError, match="is not a file"):
        read_pairs([str(tmp_path)], 16)
