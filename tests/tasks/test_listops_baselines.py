"""benchmarks/listops_baselines.py: the top-level digits against a tree built here from the text form,
and the fitted rules on sets whose best rule is known."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from reformer.tasks import listops

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "listops_baselines.py"
_spec = importlib.util.spec_from_file_location("listops_baselines", _path)
baselines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(baselines)


def oracle_top_digits(text: str) -> list[int]:
    """The digit children of the root of ``[OP arg ... ]``, from a nested-list parse of the text."""
    stack: list[list] = [[]]
    for token in text.split():
        if token.startswith("["):
            stack.append([token])
        elif token == "]":
            node = stack.pop()
            stack[-1].append(node)
        else:
            stack[-1].append(int(token))
    (root,) = stack[0]
    return [child for child in root[1:] if isinstance(child, int)]


def test_top_level_digits_match_a_parse_of_the_text():
    rng = random.Random(3)
    for _ in range(200):
        ids = listops.generate(rng, 10, 200)
        assert baselines.top_level_digits(ids) == oracle_top_digits(listops.to_text(ids))
    assert baselines.top_level_digits(listops.from_text("[MAX 2 [MIN 9 7 ] 5 ]")) == [2, 5]


def test_rules_fit_and_score_known_sets():
    maxes = [listops.from_text(t) for t in ("[MAX 2 3 ]", "[MAX 9 1 ]", "[MAX 4 [MIN 9 9 ] ]")]
    labels = [listops.evaluate(r) for r in maxes]  # 3, 9, 9
    fit = test = (maxes, labels)
    # The operator alone: every MAX gets its most frequent value 9, right for two of three.
    assert abs(baselines.rule_accuracy(baselines.outer_operator, fit, test) - 2 / 3) < 1e-12
    # With the top-level digits (largest 3, 9, 4) each key sees one label: all right on its own fit set.
    assert baselines.rule_accuracy(baselines.outer_operator_and_top_digits, fit, test) == 1.0
    # A key the fit set lacks falls back to the operator's most frequent value.
    unseen = ([listops.from_text("[MAX 7 [MAX 9 1 ] ]")], [9])  # top-level largest 7: not in the fit set
    assert baselines.rule_accuracy(baselines.outer_operator_and_top_digits, fit, unseen) == 1.0
