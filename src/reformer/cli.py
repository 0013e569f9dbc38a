"""The ``reformer`` command line: ``reformer <command> [options]`` (also ``python -m reformer``).

Each command is one ``add_<command>(subparsers)`` function that registers its parser, its options and
the function that runs it (``handler(args, parser) -> exit code``); list it in ``COMMANDS``. Commands
import their heavy modules inside the handler or the ``add_`` function, so ``reformer --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace, argparse.ArgumentParser], int]


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    """``reformer bench``: time and peak memory of attention layers and models against length."""
    from . import bench

    p = subparsers.add_parser(
        "bench",
        help="time and peak memory of LSH / local / full attention and of whole models, by length",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(p)
    p.set_defaults(handler=bench.run, parser=p)


def add_convert(subparsers: argparse._SubParsersAction) -> None:
    """``reformer convert``: an HF transformers Reformer checkpoint folder to ours, or back."""
    p = subparsers.add_parser(
        "convert",
        help="convert an HF Reformer checkpoint folder to a reformer one (or back with --to-hf)",
        description=(
            "Convert an HF transformers ReformerModelWithLMHead folder (config.json + model.safetensors or "
            "pytorch_model.bin) into a reformer checkpoint folder (config.json + model.safetensors), or with "
            "--to-hf a reformer folder into an HF one (needs transformers: the [hf] extra)."
        ),
    )
    p.add_argument("source", help="the folder to read")
    p.add_argument("out", help="the folder to write (created if missing)")
    p.add_argument("--to-hf", action="store_true", help="read a reformer folder and write an HF one")
    p.set_defaults(handler=run_convert, parser=p)


def run_convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .model import ReformerLM

    try:
        if args.to_hf:
            ReformerLM.from_pretrained(args.source).to_hf().save_pretrained(args.out)
        else:
            ReformerLM.from_hf(args.source).save_pretrained(args.out)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as err:
        parser.error(str(err))
    print(f"wrote {args.out}")
    return 0


def add_train(subparsers: argparse._SubParsersAction) -> None:
    """``reformer train``: train a language model (or the copy task); resumable, DDP under torchrun."""
    from . import train

    p = subparsers.add_parser(
        "train",
        help="train a Reformer LM on files, enwik8 or the default corpus (or the copy task)",
        description=train.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_train_arguments(p)
    p.set_defaults(handler=train.run_train, parser=p)


def add_eval(subparsers: argparse._SubParsersAction) -> None:
    """``reformer eval``: held-out bits per byte (or copy-task accuracy) of a trained run."""
    from . import train

    p = subparsers.add_parser(
        "eval",
        help="held-out bits per byte on the test split, or copy-task accuracy, of a run",
        description="Evaluate a run folder; the last line is bits_per_byte=X or accuracy=X.",
    )
    train.add_eval_arguments(p)
    p.set_defaults(handler=train.run_eval, parser=p)


def add_generate(subparsers: argparse._SubParsersAction) -> None:
    """``reformer generate``: stream text sampled from a model folder, with the incremental cache."""
    from . import generation

    p = subparsers.add_parser(
        "generate",
        help="sample text from a model or run folder, streamed to stdout (cached incremental decoding)",
        description="Byte-level generation: the prompt's UTF-8 bytes are the ids (plus --id-offset); the "
        "continuation is streamed to stdout as it is produced, a summary line goes to stderr.",
    )
    generation.add_arguments(p)
    p.set_defaults(handler=generation.run, parser=p)


# One entry per subcommand (train, eval, generate: add an ``add_<name>`` function here).
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_train,
    add_eval,
    add_bench,
    add_convert,
    add_generate,
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="reformer",
        description="Reformer: Transformers for very long sequences (LSH attention, reversible layers).",
    )
    parser.add_argument("--version", action="version", version=f"reformer {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler: Handler = args.handler
    return handler(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
