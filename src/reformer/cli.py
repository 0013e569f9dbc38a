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


# One entry per subcommand (train, eval, generate: add an ``add_<name>`` function here).
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_bench, add_convert)


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
