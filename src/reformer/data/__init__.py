"""Corpora and data formats: ``bytes`` (files, enwik8, the default corpus), ``tokens`` (``.npy`` /
``.bin`` token ids), ``tokenizer`` (text through an HF ``tokenizers`` BPE), ``fasta`` (genomes) and
``images`` (PNG/JPEG), chosen by :func:`load_data` from the registry in :mod:`.registry`; the windows a
model trains on.

Modules: paths (cache folder, file lists, the split by file), corpus (the ``Corpus`` of a token stream
and its windows), byte_corpus, tokens, tokenizer, fasta, images (one per format), registry, codec (how a
model folder spells its ids).
"""

from .byte_corpus import (
    COPY_BLOCK,
    ENWIK8_BYTES,
    ENWIK8_TRAIN,
    ENWIK8_VALID,
    FILE_SEPARATOR,
    default_corpus,
    default_corpus_files,
    load_corpus,
)
from .codec import DATA_FORMAT_FILE, load_codec, save_codec
from .corpus import (
    IGNORE_INDEX,
    Corpus,
    contiguous_windows,
    decode_bytes,
    encode_text,
    random_windows,
    windows_at,
)
from .fasta import GenomeCorpus, default_genome, load_fasta, read_records, reverse_complement
from .images import ImageSet, load_images, save_grid
from .paths import HELD_OUT_FRACTION, cache_dir, is_held_out
from .registry import FORMATS, DataFormat, detect_format, load_data
from .tokenizer import TokenizedCorpus, Tokenizer, load_tokenized, load_tokenizer, train_tokenizer
from .tokens import TOKEN_DTYPES, TokenCorpus, check_ids, load_tokens, open_token_file

__all__ = [
    "COPY_BLOCK",
    "DATA_FORMAT_FILE",
    "ENWIK8_BYTES",
    "ENWIK8_TRAIN",
    "ENWIK8_VALID",
    "FILE_SEPARATOR",
    "FORMATS",
    "HELD_OUT_FRACTION",
    "IGNORE_INDEX",
    "TOKEN_DTYPES",
    "Corpus",
    "DataFormat",
    "GenomeCorpus",
    "ImageSet",
    "TokenCorpus",
    "TokenizedCorpus",
    "Tokenizer",
    "cache_dir",
    "check_ids",
    "contiguous_windows",
    "decode_bytes",
    "default_corpus",
    "default_corpus_files",
    "default_genome",
    "detect_format",
    "encode_text",
    "is_held_out",
    "load_codec",
    "load_corpus",
    "load_data",
    "load_fasta",
    "load_images",
    "load_tokenized",
    "load_tokenizer",
    "load_tokens",
    "open_token_file",
    "random_windows",
    "read_records",
    "reverse_complement",
    "save_codec",
    "save_grid",
    "train_tokenizer",
    "windows_at",
]
