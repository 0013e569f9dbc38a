"""Labelled text for classification: a JSON-lines file (one ``{"text": ..., "label": ...}`` object per
line) or a folder with one sub-folder per class holding one text file per example.

Texts become their UTF-8 bytes (ids 0-255). Every problem with the input is a :class:`DataError` that
names the file and line (or file) and says how to fix it; nothing is silently dropped or cut, except
that ``truncate=True`` cuts texts longer than ``max_len`` bytes on purpose.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

EXAMPLE_LINE = '{"text": "a great film", "label": "pos"}'


class DataError(ValueError):
    """Bad labelled input; the message names the place and the fix."""


@dataclass
class LabelledSet:
    """Examples as byte-id lists with label ids into ``labels`` (the class names, in id order)."""

    ids: list[list[int]]
    label_ids: list[int]
    labels: list[str]
    where: list[str]  # "file:line" (or the file) of each example, for messages

    def __len__(self) -> int:
        return len(self.ids)


def label_names(found: Sequence[str]) -> list[str]:
    """The sorted distinct class names; numerically when they are all integers (so "10" follows "9")."""
    names = sorted(set(found))
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    return names


def read_examples(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """``(text, label, where)`` for each example of a JSONL file or a class-per-folder tree."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; give a .jsonl file or a folder with one sub-folder per class"
        )
    return _read_jsonl(path)


def _read_jsonl(path: Path) -> list[tuple[str, str, str]]:
    examples = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text ({err}); save it as UTF-8") from err
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: not valid JSON ({err.msg}); each line must be one object like {EXAMPLE_LINE}"
            ) from err
        if not isinstance(obj, dict):
            raise DataError(f"{where}: a JSON {type(obj).__name__}, not an object like {EXAMPLE_LINE}")
        for key in ("text", "label"):
            if key not in obj or obj[key] is None:
                raise DataError(
                    f'{where}: no "{key}"; every line needs "text" and "label", like {EXAMPLE_LINE}'
                )
        if not isinstance(obj["text"], str):
            raise DataError(f'{where}: "text" must be a string, got {type(obj["text"]).__name__}')
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f'{where}: "label" must be a string or an integer, got {label!r}')
        examples.append((obj["text"], str(label), where))
    if not examples:
        raise DataError(f"{path} holds no examples; write one JSON object per line like {EXAMPLE_LINE}")
    return examples


def _read_folder(root: Path) -> list[tuple[str, str, str]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root} has no sub-folders; put each class's text files in a sub-folder named after it"
        )
    examples = []
    for folder in classes:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{folder} (class {folder.name!r}) holds no files; add examples or remove it")
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{file} is not UTF-8 text ({err}); save it as UTF-8") from err
            examples.append((text, folder.name, str(file)))
    return examples


def load_labelled(
    path: str | os.PathLike,
    max_len: int,
    labels: Sequence[str] | None = None,
    truncate: bool = False,
) -> LabelledSet:
    """Read and check a labelled set. ``labels``: the run's classes (at evaluation, or for the
    validation set); None takes them from this file. Texts longer than ``max_len`` bytes are an error
    unless ``truncate`` (then they keep their first ``max_len`` bytes)."""
    examples = read_examples(path)
    names = list(labels) if labels is not None else label_names([label for _, label, _ in examples])
    index = {name: i for i, name in enumerate(names)}
    out = LabelledSet([], [], names, [])
    for text, label, where in examples:
        if label not in index:
            raise DataError(
                f"{where}: label {label!r} is not one of the run's classes {names}; fix the label, or "
                "train a run whose training set has this class"
            )
        data = list(text.encode("utf-8"))
        if not text.strip():
            raise DataError(f"{where}: the text is empty; remove the example or give it text")
        if len(data) > max_len:
            if not truncate:
                raise DataError(
                    f"{where}: the text is {len(data)} bytes, over the model's max_seq_len {max_len}; pass "
                    "--truncate to keep the first bytes, or train with a larger --seq-len"
                )
            data = data[:max_len]
        out.ids.append(data)
        out.label_ids.append(index[label])
        out.where.append(where)
    if labels is None and len(names) < 2:
        raise DataError(f"{path} has only the class {names}; classification needs at least two classes")
    return out
