"""The ``reformer`` command line: ``reformer <command> [options]`` (also ``python -m reformer``).

Each command is one ``add_<command>(subparsers)`` function that passes its name, help, options and the
function that runs it (``handler(args, parser) -> exit code``) to :func:`register`; list it in
``COMMANDS``. Options that depend on the command line itself (the flags of the task a run trains) come
from ``add_later(parser, args)``, called with the command's arguments before they are parsed. Commands
import their heavy modules inside the handler or the ``add_`` function, so ``reformer --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace, argparse.ArgumentParser], int]
AddLater = Callable[[argparse.ArgumentParser, list[str]], None]


def register(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    handler: Handler,
    add_later: AddLater | None = None,
) -> None:
    """Add the ``name`` command: its parser (``description`` shown verbatim), options and handler;
    ``add_later(parser, args)`` adds the options that depend on the command's arguments ``args``."""
    p = subparsers.add_parser(
        name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    p.set_defaults(handler=handler, parser=p)
    p.add_later = add_later


def add_train(subparsers: argparse._SubParsersAction) -> None:
    """``reformer train``: train a model on a task (--task); resumable, DDP under torchrun."""
    from . import train

    help = "train a Reformer on a task: language modelling (default), copy, encoders, encoder-decoders"
    register(
        subparsers, "train", help, train.__doc__, train.add_train_arguments, train.run_train,
        train.add_task_arguments,
    )  # fmt: skip


def add_eval(subparsers: argparse._SubParsersAction) -> None:
    """``reformer eval``: the held-out metrics of a trained run (its task's)."""
    from . import train

    help = "held-out metrics of a run: bits per byte on the test split, accuracy, ..."
    description = (
        "Evaluate a run folder on its task's test data; the last line is bits_per_byte=X (bits_per_token,\n"
        "bits_per_base, bits_per_dim for other data formats) or accuracy=X (macro_f1=X for classifiers).\n"
        "The run's task adds flags: reformer eval RUN --help lists them."
    )
    register(
        subparsers, "eval", help, description, train.add_eval_arguments, train.run_eval,
        train.add_task_eval_arguments,
    )  # fmt: skip


def add_generate(subparsers: argparse._SubParsersAction) -> None:
    """``reformer generate``: stream text sampled from a model folder, with the incremental cache."""
    from . import generate_command

    help = "sample text (or images) from a model or run folder, streamed to stdout (cached decoding)"
    description = (
        "The prompt is encoded as the run's data (UTF-8 bytes, plus --id-offset for byte models without\n"
        "a data format; a run's tokenizer; bases; token ids) and the continuation is streamed to stdout\n"
        "as it is produced, a summary line to stderr. Image models: --images N --out grid.png."
    )
    register(subparsers, "generate", help, description, generate_command.add_arguments, generate_command.run)


def add_predict(subparsers: argparse._SubParsersAction) -> None:
    """``reformer predict``: labels and probabilities of a trained classifier for texts."""
    from .train import predict_command

    help = "labels and probabilities from a classifier run (--task classify | listops) for texts"
    description = "One line per text: the label, its probability, then the top classes as label=p."
    register(
        subparsers, "predict", help, description, predict_command.add_predict_arguments,
        predict_command.run_predict,
    )  # fmt: skip


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    """``reformer bench``: time and peak memory of attention layers and models against length."""
    from . import bench

    help = "time and peak memory of LSH / local / full attention and of whole models, by length"
    register(subparsers, "bench", help, bench.__doc__, bench.add_arguments, bench.run)


def add_convert(subparsers: argparse._SubParsersAction) -> None:
    """``reformer convert``: an HF transformers Reformer checkpoint folder to ours, or back."""
    help = "convert an HF Reformer checkpoint folder to a reformer one (or back with --to-hf)"
    description = (
        "Convert an HF transformers ReformerModelWithLMHead folder (config.json + model.safetensors or\n"
        "pytorch_model.bin) into a reformer checkpoint folder (config.json + model.safetensors), or with\n"
        "--to-hf a reformer folder into an HF one (needs transformers: the [hf] extra)."
    )
    register(subparsers, "convert", help, description, add_convert_arguments, run_convert)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="the folder to read")
    p.add_argument("out", help="the folder to write (created if missing)")
    p.add_argument("--to-hf", action="store_true", help="read a reformer folder and write an HF one")


def run_convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .models import ReformerLM

    try:
        if args.to_hf:
            ReformerLM.from_pretrained(args.source).to_hf().save_pretrained(args.out)
        else:
            ReformerLM.from_hf(args.source).save_pretrained(args.out)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as err:
        parser.error(str(err))
    print(f"wrote {args.out}")
    return 0


def add_tokenizer(subparsers: argparse._SubParsersAction) -> None:
    """``reformer tokenizer train``: a byte-level BPE (HF tokenizers) trained offline on text files."""
    from .data import tokenizer_command

    help = "train a subword tokenizer (byte-level BPE) for --tokenizer, offline"
    description = "Subword tokenizers for `reformer train --tokenizer DIR` (needs the [tokenizers] extra)."
    register(
        subparsers, "tokenizer", help, description, tokenizer_command.add_arguments, tokenizer_command.run
    )


# One entry per subcommand: an ``add_<name>`` function that calls :func:`register`.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_train,
    add_eval,
    add_bench,
    add_convert,
    add_generate,
    add_predict,
    add_tokenizer,
)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of ``reformer``; for ``argv`` (a command line) naming a command, of that command only
    (each command imports its own modules, which a one-shot ``reformer generate`` need not pay for), with
    the options the command adds for it (``add_later``)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="reformer",
        description="Reformer: Transformers for very long sequences (LSH attention, reversible layers).",
    )
    parser.add_argument("--version", action="version", version=f"reformer {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    # The top level has only switches, so the first word is the command.
    at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    name = argv[at] if at is not None else None
    names = {add.__name__.removeprefix("add_") for add in COMMANDS}
    for add in COMMANDS:
        if name not in names or add.__name__ == f"add_{name}":
            add(subparsers)
    command = subparsers.choices.get(name) if name is not None else None
    if command is not None and command.add_later is not None:
        command.add_later(command, list(argv[at + 1 :]))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler: Handler = args.handler
    return handler(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
