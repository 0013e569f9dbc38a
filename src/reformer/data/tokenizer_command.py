"""``reformer tokenizer train``: a byte-level BPE trained offline on the training split of ``--data`` (the
default corpus when none), written as ``DIR/tokenizer.json`` for ``reformer train --tokenizer DIR``."""

from __future__ import annotations

import argparse
import sys
import time

from .byte_corpus import load_corpus
from .tokenizer import MIN_VOCAB, encode_array, text_chunks, train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(title="actions", dest="tokenizer_action", metavar="<action>")
    train = actions.add_parser(
        "train", help="train a byte-level BPE on text files or the default corpus",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    train.add_argument(
        "--data", nargs="+", metavar="PATH",
        help="text files or folders, split as `reformer train --data` splits them (default: the Python "
        "standard library sources)",
    )  # fmt: skip
    train.add_argument("--valid", metavar="PATH", help="a held-out file or folder (then all --data trains)")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens in all, 257 or more (e.g. 8192)")
    train.add_argument("--min-frequency", type=int, default=2, help="occurrences a merge needs (default 2)")
    train.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json into")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.tokenizer_action != "train":
        parser.error("give an action: reformer tokenizer train --vocab-size N --out DIR")
    if args.vocab_size <= MIN_VOCAB:
        parser.error(
            f"--vocab-size {args.vocab_size}: a byte-level BPE needs more than the {MIN_VOCAB} bytes"
        )
    started = time.monotonic()
    try:
        corpus = load_corpus(args.data, args.valid)
        skipped: list[int] = []
        tokenizer = train_tokenizer(text_chunks(corpus.train, skipped), args.vocab_size, args.min_frequency)
        path = tokenizer.save(args.out)
        held_out = encode_array(tokenizer, corpus.test)
    except (FileNotFoundError, ValueError, ImportError) as err:
        parser.error(str(err))
    print(f"data: {corpus.describe()}", file=sys.stderr)
    if sum(skipped):
        print(
            f"{sum(skipped):,} bytes of the training text are not UTF-8 and were left out of training "
            "(they still encode, as single-byte tokens)", file=sys.stderr,
        )  # fmt: skip
    if tokenizer.vocab_size < args.vocab_size:
        print(
            f"the text allows only {tokenizer.vocab_size:,} tokens (merges seen {args.min_frequency}+ times)",
            file=sys.stderr,
        )
    per_token = len(corpus.test) / max(len(held_out), 1)
    print(
        f"wrote {path}: {tokenizer.vocab_size:,} tokens, {per_token:.3f} held-out bytes per token, "
        f"{time.monotonic() - started:.1f} s"
    )
    return 0
