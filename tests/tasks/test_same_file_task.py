"""benchmarks/same_file_task.py's identifier-overlap rule on examples whose overlaps are counted by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "same_file_task.py"
_spec = importlib.util.spec_from_file_location("same_file_task", _path)
task = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task)


def pair(first: str, second: str, label: str) -> dict:
    return {"text": first + task.SEPARATOR + second, "label": label}


def test_identifier_overlap_counts_shared_identifiers():
    # identifiers {def, foo, bar} and {foo, baz}: one shared of four (one-letter names are not counted)
    assert task.identifier_overlap(pair("def foo(bar): 1", "foo = baz + 2", "same")["text"]) == 0.25
    assert task.identifier_overlap(pair("x1 = 2", "# 3 4", "different")["text"]) == 0.0


def test_overlap_baseline_picks_the_threshold_on_the_training_set(tmp_path):
    train = [pair("alpha beta", "alpha beta", "same"), pair("alpha beta", "gamma delta", "different"),
             pair("one two", "one three", "same"), pair("one two", "four five", "different")]  # fmt: skip
    # held out: overlaps 1/3 (same), 0 (different), 0 (same: missed by any threshold above 0)
    valid = [
        pair("pa qa", "pa ra", "same"),
        pair("pa qa", "sa ta", "different"),
        pair("ua va", "wa za", "same"),
    ]
    for name, rows in (("train.jsonl", train), ("valid.jsonl", valid)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    threshold, train_acc, valid_acc = task.overlap_baseline(tmp_path)
    assert 0 < threshold <= 1 / 3 and train_acc == 1.0 and abs(valid_acc - 2 / 3) < 1e-12
