"""Where a run's metrics go besides ``metrics.jsonl`` and ``loss.png``: TensorBoard, or a logger of
your own.

A logger is any object with ``log(record)`` and ``close()`` (``flush()`` too, optionally: it is called
after each held-out evaluation). ``record`` is one line of ``metrics.jsonl``: a dict with ``step`` (int),
``split`` (``"train"`` or ``"eval"``) and numbers (``loss``, ``lr``, ``tokens_per_s``, an evaluation's
``bits_per_byte`` / ``accuracy`` ...). Register a factory ``factory(run_folder, start_step) -> logger``
under a name, and ``--log NAME`` (``TrainConfig(log=[NAME])``) uses it on the main process::

    from reformer.train.loggers import register_logger

    class PrintLogger:
        def __init__(self, run, start_step):
            pass

        def log(self, record):
            print(record["step"], record["split"], record["loss"])

        def close(self):
            pass

    register_logger("print", PrintLogger)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

TENSORBOARD_DIR = "tensorboard"


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Entry:
    factory: Callable[[Path, int], Logger]
    requires: str | None  # a module that must be importable, named in the error when it is not
    install: str


LOGGERS: dict[str, _Entry] = {}


def register_logger(
    name: str, factory: Callable[[Path, int], Logger], requires: str | None = None, install: str = ""
) -> None:
    """Make ``--log name`` call ``factory(run_folder, start_step)`` (``start_step``: 0, or the step a
    resumed run continues from). ``requires`` names a module checked before the run starts; ``install``
    says how to get it."""
    LOGGERS[name] = _Entry(factory, requires, install)


def check_logger_names(names: Sequence[str]) -> None:
    """``ValueError`` naming an unknown logger or one whose package is missing, before a run starts."""
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"--log {name} is unknown; use one of {sorted(LOGGERS)} or register_logger()")
        entry = LOGGERS[name]
        if entry.requires and importlib.util.find_spec(entry.requires) is None:
            raise ValueError(f"--log {name} needs the {entry.requires} package: {entry.install}")


class TensorBoardLogger:
    """Scalars ``<split>/<metric>`` at each ``step`` in ``RUN/tensorboard`` (view them with
    ``tensorboard --logdir RUN``). A resumed run first drops the events after its checkpoint's step, as
    ``metrics.jsonl`` does."""

    def __init__(self, run: Path, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # Events from step start_step + 1 on were logged after the checkpoint a resumed run starts from.
        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(str(Path(run) / TENSORBOARD_DIR), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        split = record.get("split", "train")
        for key, value in record.items():
            if key in ("step", "split", "time") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{key}", value, record["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


register_logger(
    "tensorboard", TensorBoardLogger, requires="tensorboard", install="pip install 'reformer[tensorboard]'"
)


class RunLog:
    """What the training loop logs to: ``metrics`` (the run's :class:`~reformer.train.metrics.MetricsLog`)
    and the loggers named in ``names``, the latter only where ``metrics`` is enabled (the main process)."""

    def __init__(self, metrics, names: Sequence[str] = (), start_step: int = 0) -> None:
        check_logger_names(names)
        self.metrics = metrics
        run = metrics.path.parent
        self.loggers = [LOGGERS[n].factory(run, start_step) for n in names] if metrics.enabled else []

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.log(record)
        for logger in self.loggers:
            logger.log(dict(record))

    def plot(self) -> None:
        self.metrics.plot()
        for logger in self.loggers:
            if hasattr(logger, "flush"):
                logger.flush()

    def close(self) -> None:
        self.plot()
        for logger in self.loggers:
            logger.close()
