"""``reformer generate``: text from a model or run folder, streamed to stdout, encoded and spelled as
the run's data format (bytes, a tokenizer, bases, token ids; :mod:`reformer.data.codec`); whole images
to a PNG grid for image models."""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import time
from pathlib import Path

import torch

from .data import DATA_FORMAT_FILE, load_codec
from .data.images import centre_square, read_image, save_grid
from .devices import default_device
from .generation.streaming import stream
from .models import ReformerEncoderDecoder, ReformerLM

# Token ids of HF's enwik8 checkpoints are byte + 2 (0 is padding); ours are plain bytes.
ENWIK8_VOCAB, ENWIK8_OFFSET = 258, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="a model folder (save_pretrained) or a `reformer train` run folder"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text (UTF-8; bases for DNA, ids for token files)")
    source.add_argument("--prompt-file", type=Path, help="read the prompt from this file (bytes as they are)")
    source.add_argument("--source", help="encoder-decoder models: the source text (UTF-8) to decode from")
    source.add_argument(
        "--source-file", type=Path, help="encoder-decoder models: read the source from a file"
    )
    source.add_argument("--images", type=int, metavar="N", help="image models: sample N whole images")
    parser.add_argument("--out", type=Path, help="with --images: the PNG grid to write")
    parser.add_argument(
        "--complete", type=Path, metavar="IMAGE",
        help="with --images: every sample starts with this image's top --rows rows",
    )  # fmt: skip
    parser.add_argument("--rows", type=int, default=0, help="with --complete: the rows kept (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: probability mass kept")
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0,
        help="divide the positive logits of tokens already in the text by this (and multiply the "
        "negative ones); 1.0 (default) is none, 1.1-1.3 discourages loops",
    )  # fmt: skip
    parser.add_argument(
        "--stop", action="append", metavar="TEXT",
        help="stop once the output ends with TEXT (its UTF-8 bytes; kept in the output); repeatable. "
        "A newline in bash: --stop $'\\n'",
    )  # fmt: skip
    parser.add_argument("--eos-id", type=int, help="stop after this token id (e.g. an end-of-text id)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    parser.add_argument("--n-hashes", type=int, default=None, help="LSH rounds (default: the config's)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    parser.add_argument(
        "--hf-compatible", action="store_true",
        help="cached LSH steps follow HF transformers' rule (for models converted from HF)",
    )  # fmt: skip
    parser.add_argument(
        "--id-offset", type=int, default=None,
        help="byte models: token id of byte b is b + offset (default: 2 for a 258-token vocabulary, HF's "
        "enwik8, else 0)",
    )  # fmt: skip
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    args.device = str(default_device(args.device))
    if args.source is not None or args.source_file is not None:
        return run_source(args, parser)
    if args.images is None and (args.out is not None or args.complete is not None):
        parser.error("--out and --complete go with --images N")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    try:
        model = ReformerLM.from_pretrained(args.checkpoint, map_location=args.device)
        vocab = model.config.vocab_size
        offset = args.id_offset
        if (
            offset is None
            and vocab == ENWIK8_VOCAB
            and not (Path(args.checkpoint) / DATA_FORMAT_FILE).exists()
        ):
            offset = ENWIK8_OFFSET
        codec = load_codec(args.checkpoint, vocab, offset)
        if args.images is not None:
            return _images(args, parser, model, codec, generator)
        data = args.prompt.encode("utf-8") if args.prompt is not None else args.prompt_file.read_bytes()
        if not data:
            parser.error("the prompt is empty; give at least one byte")
        ids = torch.tensor([codec.encode(data)], dtype=torch.long, device=args.device)
    except (FileNotFoundError, ValueError, OSError, ImportError) as err:
        parser.error(str(err))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    info: dict[str, int] = {}
    start, count = time.perf_counter(), 0
    try:
        tokens = stream(
            model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, not args.no_cache,
            args.n_hashes, generator, hf_compatible=args.hf_compatible,
            on_cache=lambda c: info.update(cache_bytes=c.nbytes()), eos_token_id=args.eos_id,
            stop=[[int(i) for i in codec.encode(text.encode("utf-8"))] for text in args.stop or []],
            repetition_penalty=args.repetition_penalty,
        )  # fmt: skip
        for next_ids in tokens:
            count += 1
            out.write(decoder.decode(codec.spell(int(next_ids[0]))))
            out.flush()
        out.write(decoder.decode(b"", final=True) + "\n")
        out.flush()
    except ValueError as err:
        parser.error(str(err))
    except BrokenPipeError:  # the reader stopped early (`| head`): stop generating, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    elapsed = time.perf_counter() - start
    cache = f", cache {info['cache_bytes'] / 2**20:.1f} MiB" if "cache_bytes" in info else ""
    print(f"[{count} tokens in {elapsed:.2f} s, prompt {ids.shape[1]} tokens{cache}]", file=sys.stderr)
    return 0


def _images(args, parser, model, codec, generator) -> int:
    """``--images N --out grid.png``: whole images sampled from an image model, as one PNG grid."""
    from .generation.images import sample_images

    if codec.format != "images":
        parser.error(
            f"--images needs a model trained on the images format; {args.checkpoint} reads {codec.format}"
        )
    if args.out is None:
        parser.error("--images N needs --out grid.png")
    prompt = centre_square(read_image(args.complete), codec.size) if args.complete is not None else None
    if args.rows and prompt is None:
        parser.error("--rows needs --complete IMAGE")
    start = time.perf_counter()
    images = sample_images(
        model, args.images, codec.size, args.temperature, args.top_k, args.top_p, generator, prompt,
        args.rows, args.n_hashes,
    )  # fmt: skip
    save_grid(images, args.out)
    elapsed = time.perf_counter() - start
    print(
        f"wrote {args.out}: {args.images} images of {codec.size}x{codec.size} in {elapsed:.1f} s",
        file=sys.stderr,
    )
    return 0


def run_source(args, parser) -> int:
    """``reformer generate DIR --source TEXT|--source-file F`` for an encoder-decoder byte model (source
    and target ids are bytes): prints the decoded target."""
    try:
        model = ReformerEncoderDecoder.from_pretrained(args.checkpoint, map_location=args.device)
        data = args.source.encode("utf-8") if args.source is not None else args.source_file.read_bytes()
    except (FileNotFoundError, ValueError, OSError) as err:
        parser.error(f"{err} (--source needs a model saved by ReformerEncoderDecoder)")
    if not data:
        parser.error("the source is empty; give at least one byte")
    if model.config.encoder.vocab_size < 256 or model.config.decoder.vocab_size < 256:
        parser.error(
            f"this model's vocabularies ({model.config.encoder.vocab_size} / "
            f"{model.config.decoder.vocab_size} ids) are not bytes; call model.generate(source_ids) "
            "from Python"
        )
    ids = torch.tensor([list(data)], dtype=torch.long, device=args.device)
    limit = model.config.decoder.max_seq_len
    if args.max_new_tokens > limit:
        print(
            f"[--max-new-tokens {args.max_new_tokens} > the decoder's max_seq_len: {limit}]", file=sys.stderr
        )
    generator = None if args.seed is None else torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        out = model.generate(
            ids, max_new_tokens=min(args.max_new_tokens, limit), temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, generator=generator, use_cache=not args.no_cache,
            n_hashes=args.n_hashes,
        )  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    values = [int(i) for i in out[0] if int(i) < 256]
    print(bytes(values).decode("utf-8", errors="replace"))
    elapsed = time.perf_counter() - start
    print(f"[{out.shape[1]} tokens in {elapsed:.2f} s, source {len(data)} bytes]", file=sys.stderr)
    return 0
