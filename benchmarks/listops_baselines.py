"""What ListOps labels allow without reading the expression, and where trained runs stand against that.

On the generated test set of ``reformer eval`` (the same seed and lengths), prints the accuracy of
  - the most frequent class,
  - the outermost-operator rule: the most frequent value for the expression's first token (MAX, MIN,
    MED, SM), fitted on a separate generated set: what a model that reads only the first token gets,
  - the outermost operator plus its direct digit arguments (MAX: their largest, MIN: their smallest;
    MED and SM: the operator alone), fitted the same way: what reading the top level of the tree adds,
and, for each run folder given, its accuracy overall, per outermost operator and per third of the length
range on the same expressions.

    python benchmarks/listops_baselines.py --min-len 128 --max-len 512 runs/listops-full runs/listops-local
    python benchmarks/listops_baselines.py --min-len 500 --max-len 1999      # LRA's lengths
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import torch

from reformer.tasks import listops
from reformer.tasks.encoder import split_padding
from reformer.tasks.listops import TEST_SEED
from reformer.train import load_run

FIT_SEED = 1  # the set the rules are fitted on (the test set uses TEST_SEED)


def top_level_digits(ids: Sequence[int]) -> list[int]:
    """The digits that are direct arguments of the outermost operator."""
    depth, out = 0, []
    for token in ids:
        if 10 <= token < 10 + len(listops.OPERATORS):
            depth += 1
        elif token == listops.TOKEN_ID[listops.END]:
            depth -= 1
        elif depth == 1:
            out.append(token)
    return out


def outer_operator(ids: Sequence[int]) -> tuple:
    return (ids[0],)


def outer_operator_and_top_digits(ids: Sequence[int]) -> tuple:
    digits = top_level_digits(ids)
    if ids[0] == listops.TOKEN_ID["[MAX"]:
        return ids[0], max(digits, default=-1)
    if ids[0] == listops.TOKEN_ID["[MIN"]:
        return ids[0], min(digits, default=10)
    return (ids[0],)


def rule_accuracy(
    key: Callable[[Sequence[int]], tuple], fit: tuple[list, list], test: tuple[list, list]
) -> float:
    """Accuracy on ``test`` of "the most frequent label of this key on ``fit``" (an unseen key: the
    outer operator's most frequent label)."""
    by_key: dict[tuple, Counter] = defaultdict(Counter)
    by_op: dict[int, Counter] = defaultdict(Counter)
    for row, label in zip(*fit, strict=True):
        by_key[key(row)][label] += 1
        by_op[row[0]][label] += 1
    right = 0
    for row, label in zip(*test, strict=True):
        counts = by_key.get(key(row)) or by_op[row[0]]
        right += counts.most_common(1)[0][0] == label
    return right / len(test[1])


@torch.no_grad()
def run_predictions(run: str, rows: list[list[int]], batch_size: int = 8) -> list[int]:
    _, _, model = load_run(run, torch.device("cpu"))
    model.eval()
    preds: list[int] = []
    for start in range(0, len(rows), batch_size):
        ids, mask = split_padding(listops.pad_rows(rows[start : start + batch_size]))
        preds += model(ids, attention_mask=mask).argmax(-1).tolist()
    return preds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="listops run folders to evaluate on the same expressions")
    p.add_argument("--min-len", type=int, default=128, help="expressions longer than this")
    p.add_argument("--max-len", type=int, default=512, help="expressions at most this long")
    p.add_argument("--n-examples", type=int, default=2000, help="test expressions (as reformer eval)")
    p.add_argument("--n-fit", type=int, default=4000, help="expressions the rules are fitted on")
    args = p.parse_args()
    fit = listops.listops_set(args.n_fit, args.min_len, args.max_len + 1, FIT_SEED)
    test = listops.listops_set(args.n_examples, args.min_len, args.max_len + 1, TEST_SEED)
    rows, labels = test
    mean_len = sum(map(len, rows)) / len(rows)
    print(f"{len(rows)} test expressions, lengths {args.min_len + 1}-{args.max_len} (mean {mean_len:.0f})")
    majority = Counter(fit[1]).most_common(1)[0][0]
    print(f"most frequent class ({majority}): {sum(y == majority for y in labels) / len(labels):.4f}")
    print(f"outermost operator: {rule_accuracy(outer_operator, fit, test):.4f}")
    top = rule_accuracy(outer_operator_and_top_digits, fit, test)
    print(f"outermost operator + its digit arguments: {top:.4f}")
    for run in args.runs:
        preds = run_predictions(run, rows)
        right = [p == y for p, y in zip(preds, labels, strict=True)]
        per_op = []
        for i, name in enumerate(listops.OPERATORS):
            picked = [r for r, row in zip(right, rows, strict=True) if row[0] == 10 + i]
            per_op.append(f"{name[1:]} {sum(picked) / max(len(picked), 1):.3f} (n={len(picked)})")
        print(f"{run}: accuracy {sum(right) / len(right):.4f}; by outer operator: {', '.join(per_op)}")
        edges = [args.min_len + (args.max_len - args.min_len) * k // 3 for k in range(4)]
        per_len = []
        for lo, hi in zip(edges, edges[1:], strict=False):
            picked = [r for r, row in zip(right, rows, strict=True) if lo < len(row) <= hi]
            per_len.append(f"{lo + 1}-{hi} {sum(picked) / max(len(picked), 1):.3f} (n={len(picked)})")
        print(f"  by length: {', '.join(per_len)}")


if __name__ == "__main__":
    main()
