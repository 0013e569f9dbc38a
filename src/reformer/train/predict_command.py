"""``reformer predict``: the classes a classifier run gives texts, with their probabilities."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..devices import default_device
from ..tasks import Task, TrainingError
from ..tasks.labelled import DataError
from .runs import load_run


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a classifier run folder (reformer train --task classify | listops)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to classify (repeatable)")
    source.add_argument("--file", help='texts to classify: a .jsonl file with "text" fields, or one per line')
    p.add_argument("--truncate", action="store_true", help="cut texts over the model's max_seq_len")
    p.add_argument("--top", type=int, default=3, help="classes listed with their probabilities (default 3)")
    p.add_argument("--n-hashes", type=int, help="LSH hash rounds (default: as trained)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def run_predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """One line per text: the predicted label, its probability, then the ``--top`` classes as
    ``label=probability``."""
    device = default_device(args.device)
    try:
        cfg, task, model = load_run(args.run, device)
        names = task.class_names()
        if names is None:
            raise ValueError(
                f"{args.run} is not a classifier run (task {cfg.task!r}); train one with --task classify"
            )
        texts = (
            [(t, f"--text {i}") for i, t in enumerate(args.text, 1)]
            if args.text
            else _read_texts(Path(args.file))
        )
        rows = [_encode(task, text, where, model.config.max_seq_len, args.truncate) for text, where in texts]
    except (DataError, TrainingError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for start in range(0, len(rows), 8):
        for p in task.probabilities(model, rows[start : start + 8], args.n_hashes):
            order = p.argsort(descending=True).tolist()
            top = " ".join(f"{names[c]}={p[c]:.4f}" for c in order[: max(1, args.top)])
            print(f"{names[order[0]]}\t{p[order[0]]:.4f}\t{top}")
    return 0


def _read_texts(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"--file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f'{where}: not valid JSON ({err.msg}); write one {{"text": ...}} per line'
                ) from err
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f'{where}: no "text" string; write one {{"text": ...}} object per line')
            line = obj["text"]
        texts.append((line, where))
    if not texts:
        raise DataError(f"{path} holds no texts")
    return texts


def _encode(task: Task, text: str, where: str, max_len: int, truncate: bool) -> list[int]:
    if not text.strip():
        raise DataError(f"{where}: the text is empty; give text to classify")
    try:
        ids = task.encode_text(text)
    except ValueError as err:
        raise DataError(f"{where}: {err}") from err
    if len(ids) > max_len:
        if not truncate:
            raise DataError(
                f"{where}: the text is {len(ids)} tokens, over the model's max_seq_len {max_len}; pass "
                "--truncate to keep the first ones"
            )
        ids = ids[:max_len]
    return ids
