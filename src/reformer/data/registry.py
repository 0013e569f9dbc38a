"""The data formats: one module each, one line each in ``FORMATS``. ``load_data`` picks the format by
name, by the options given, or by the files' names, and passes each format only the options it takes.

A format is a module with a loader ``load(paths, valid=None, **options)`` that returns a corpus (a
:class:`~reformer.data.corpus.Corpus`, or an :class:`~reformer.data.images.ImageSet`): ``describe()``,
``vocab_size``, ``metric``, ``sample`` / ``sequential`` windows, ``units`` and ``encode`` / ``decode``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import byte_corpus, fasta, images, tokenizer, tokens
from .paths import expand


@dataclass(frozen=True)
class DataFormat:
    """``claims(path)``: whether a file's name marks it as this format (None: chosen only by name or
    option). ``options``: the keyword options ``load`` takes besides ``paths`` and ``valid``."""

    name: str
    summary: str
    load: Callable
    options: tuple[str, ...] = ()
    claims: Callable[[Path], bool] | None = None


FORMATS: dict[str, DataFormat] = {
    f.name: f
    for f in (
        DataFormat("bytes", "any file as bytes: vocabulary 256, bits per byte (default corpus: the "
                   "Python standard library)", byte_corpus.load_corpus),
        DataFormat("tokens", ".npy / .bin token ids (--dtype, --vocab-size), bits per token or per byte "
                   "with --tokenizer", tokens.load_tokens, ("dtype", "vocab_size", "tokenizer"),
                   tokens.is_token_path),
        DataFormat("tokenizer", "text through a tokenizers BPE (--tokenizer DIR), bits per byte",
                   tokenizer.load_tokenized, ("tokenizer",)),
        DataFormat("fasta", "FASTA/FASTQ[.gz] bases A C G T N, bits per base (default: E. coli K-12)",
                   fasta.load_fasta, ("reverse_complement",), fasta.is_fasta_path),
        DataFormat("images", "PNG/JPEG as S x S x 3 sub-pixels, bits per dimension (default: "
                   "scikit-image's photographs)", images.load_images, ("size",), images.is_image_path),
    )
}  # fmt: skip

FLAGS = {
    "dtype": "--dtype", "vocab_size": "--vocab-size", "tokenizer": "--tokenizer", "size": "--image-size",
    "reverse_complement": "--reverse-complement", "valid": "--valid",
}  # fmt: skip


def detect_format(paths: Sequence[str | os.PathLike] | None, tokenizer_given: bool = False) -> str:
    """The format of ``paths`` from the files' names: the one format that claims them all (a token file,
    FASTA, an image), ``bytes`` when none claims any; ``tokenizer`` for unclaimed files (or none) when a
    tokenizer is given. A mix is an error that asks for ``--format``."""
    if not paths:
        return "tokenizer" if tokenizer_given else "bytes"
    found: dict[str, Path] = {}
    for file in expand(paths):
        claimed = [f.name for f in FORMATS.values() if f.claims is not None and f.claims(file)]
        found.setdefault(claimed[0] if claimed else "bytes", file)
    if len(found) > 1:
        kinds = ", ".join(f"{name} ({file})" for name, file in found.items())
        raise ValueError(f"--data mixes formats: {kinds}; pass --format NAME to read all as one")
    name = next(iter(found))
    return "tokenizer" if name == "bytes" and tokenizer_given else name


def load_data(
    paths: Sequence[str | os.PathLike] | None = None,
    format: str | None = None,
    valid: str | os.PathLike | None = None,
    **options,
):
    """The corpus of ``paths`` (None or empty: the format's default corpus) in ``format`` (None: see
    :func:`detect_format`). ``options`` that are None are unset; a set option the format does not take
    is an error naming its flag."""
    options = {k: v for k, v in options.items() if v is not None}
    if format is None:
        format = detect_format(paths, "tokenizer" in options)
    if format not in FORMATS:
        raise ValueError(f"--format {format!r} must be one of {', '.join(FORMATS)}")
    chosen = FORMATS[format]
    for option in options:
        if option not in chosen.options:
            flag = FLAGS.get(option, option)
            takers = [f.name for f in FORMATS.values() if option in f.options]
            raise ValueError(
                f"{flag} does not apply to the {format} format (it is for: {', '.join(takers) or 'none'})"
            )
    return chosen.load(paths, valid=valid, **options)
