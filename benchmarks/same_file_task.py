"""Write the "same file?" classification task from the default corpus (this Python's standard library).

Each example is two excerpts of whole lines, ``--half`` bytes at most each, joined by a separator line:
label ``same`` when both come from one source file (from places at least ``--half`` bytes apart),
``different`` when they come from two files. Deciding needs the whole document: either excerpt alone
says nothing about the label, and the separator hides where a splice would be, so a model must compare
the two halves (identifiers, naming and indentation style, docstring habits) across the full length.
Training examples come from the corpus's training files, held-out ones from its held-out files (the same
split as ``reformer train --task mlm``, so MLM pretraining never saw the held-out texts).

    python benchmarks/same_file_task.py --out runs/same-file --n-train 4000 --n-valid 500
    reformer train --task classify --data runs/same-file/train.jsonl --valid runs/same-file/valid.jsonl
    python benchmarks/same_file_task.py --overlap-baseline runs/same-file

``--overlap-baseline DIR`` scores a rule that needs both halves and no training beyond one threshold: the
Jaccard overlap of the two excerpts' identifiers, ``same`` at or above the threshold that is most
accurate on ``train.jsonl``; it prints that accuracy on ``valid.jsonl`` (a check that the task can be
learned from the two halves together).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sysconfig
from pathlib import Path

from reformer.data import default_corpus_files, is_held_out

SEPARATOR = "\n#####\n"


def excerpt(text: str, rng: random.Random, half: int, start: int | None = None) -> tuple[str, int]:
    """Whole lines of ``text`` from a random (or the given) line start, at most ``half`` bytes."""
    if start is None:
        start = rng.randrange(0, max(1, len(text) - half))
        start = text.rfind("\n", 0, start) + 1
    piece = text[start : start + half]
    cut = piece.rfind("\n")
    return (piece[:cut] if cut > 0 else piece), start


def example(files: list[str], rng: random.Random, half: int) -> dict:
    same = rng.random() < 0.5
    a = rng.choice(files)
    if same:
        x, sx = excerpt(a, rng, half)
        while True:  # a second place in the same file, at least `half` bytes away
            y, sy = excerpt(a, rng, half)
            if abs(sy - sx) >= half:
                break
    else:
        b = rng.choice(files)
        while b is a:
            b = rng.choice(files)
        x, _ = excerpt(a, rng, half)
        y, _ = excerpt(b, rng, half)
    return {"text": x + SEPARATOR + y, "label": "same" if same else "different"}


def identifier_overlap(text: str) -> float:
    """Jaccard overlap of the identifier sets of an example's two excerpts."""
    first, second = text.split(SEPARATOR, 1)
    a, b = (set(re.findall(r"[A-Za-z_]\w+", part)) for part in (first, second))
    return len(a & b) / max(1, len(a | b))


def overlap_baseline(folder: Path) -> tuple[float, float, float]:
    """(threshold, training accuracy, held-out accuracy) of "same iff overlap >= threshold", the threshold
    chosen on ``train.jsonl``."""

    def scored(name: str) -> list[tuple[float, bool]]:
        lines = (folder / name).read_text().splitlines()
        return [(identifier_overlap(r["text"]), r["label"] == "same") for r in map(json.loads, lines)]

    def accuracy(rows: list[tuple[float, bool]], threshold: float) -> float:
        return sum((x >= threshold) == same for x, same in rows) / len(rows)

    train, valid = scored("train.jsonl"), scored("valid.jsonl")
    threshold = max(sorted({x for x, _ in train}), key=lambda t: accuracy(train, t))
    return threshold, accuracy(train, threshold), accuracy(valid, threshold)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for train.jsonl and valid.jsonl")
    p.add_argument("--overlap-baseline", metavar="DIR", help="score the identifier-overlap rule on DIR")
    p.add_argument("--half", type=int, default=248, help="bytes per excerpt at most")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-valid", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.overlap_baseline:
        threshold, train_acc, valid_acc = overlap_baseline(Path(args.overlap_baseline))
        print(f"identifier overlap >= {threshold:.4f}: train accuracy {train_acc:.4f}, ", end="")
        print(f"held-out {valid_acc:.4f}")
        return
    if not args.out:
        p.error("give --out (write the task) or --overlap-baseline DIR (score the overlap rule)")
    root = Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[str]] = {"train": [], "valid": []}
    for path in default_corpus_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text.encode()) == len(text) and len(text) >= 4 * args.half:  # ASCII and long enough
            splits["valid" if is_held_out(path, root) else "train"].append(text)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.n_train), ("valid", args.n_valid)):
        rows = [example(splits[split], rng, args.half) for _ in range(n)]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / split}.jsonl: {n} examples from {len(splits[split])} files")


if __name__ == "__main__":
    main()
