"""The ListOps generator against an evaluator written here from the published definition (Nangia &
Bowman 2018; LRA, Tay et al. 2021): a recursive-descent parser over the text form, sharing no code."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from reformer.tasks import listops


def oracle_value(text: str) -> int:
    """The value of ``[OP arg ... ]`` text: MAX, MIN, MED (median, truncated), SM (sum mod 10)."""
    tokens = text.split()
    pos = 0

    def node() -> int:
        nonlocal pos
        token = tokens[pos]
        pos += 1
        if token.isdigit():
            return int(token)
        args = []
        while tokens[pos] != "]":
            args.append(node())
        pos += 1
        if token == "[MAX":
            return max(args)
        if token == "[MIN":
            return min(args)
        if token == "[MED":
            return int(statistics.median(args))
        assert token == "[SM", token
        return sum(args) % 10

    value = node()
    assert pos == len(tokens), "trailing tokens"
    return value


def shape(text: str) -> tuple[int, int]:
    """(depth, most arguments of one operator) of an expression."""
    depth = deepest = widest = 0
    counts = []
    for token in text.split():
        if token.startswith("["):
            if counts:
                counts[-1] += 1
            depth += 1
            deepest = max(deepest, depth)
            counts.append(0)
        elif token == "]":
            widest = max(widest, counts.pop())
            depth -= 1
        else:
            counts[-1] += 1
    return deepest, widest


@pytest.mark.parametrize(
    "text, value",
    [
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[SM 5 6 [MAX 3 9 ] ]", 0),
        ("[MED 1 2 ]", 1),  # the mean of the middle two, truncated (LRA: int(np.median))
        ("[MED 3 8 1 ]", 3),
        ("[MIN [SM 9 9 ] [MAX 1 2 ] ]", 2),
    ],
)
def test_evaluator_on_hand_worked_expressions(text, value):
    assert oracle_value(text) == value
    assert listops.evaluate(listops.from_text(text)) == value


def test_generated_labels_lengths_and_shape_follow_the_definition():
    rows, labels = listops.listops_set(150, 60, 400, seed=3)
    assert len(set(labels)) == 10
    for row, label in zip(rows, labels, strict=True):
        text = listops.to_text(row)
        assert 60 < len(row) < 400
        assert label == oracle_value(text)
        depth, widest = shape(text)
        assert depth <= listops.MAX_DEPTH and widest <= listops.MAX_ARGS
        assert text.split()[0] in listops.OPERATORS  # a tree, not a lone digit


def test_batches_are_seeded_padded_and_labelled():
    ids, labels = listops.listops_batch(6, 20, 120, torch.Generator().manual_seed(7))
    again, _ = listops.listops_batch(6, 20, 120, torch.Generator().manual_seed(7))
    other, _ = listops.listops_batch(6, 20, 120, torch.Generator().manual_seed(8))
    assert torch.equal(ids, again) and not torch.equal(ids[:, :20], other[:, :20])
    for row, label in zip(ids, labels, strict=True):
        real = row[row != listops.PAD].tolist()
        assert (row[len(real) :] == listops.PAD).all()  # padding only at the end
        assert oracle_value(listops.to_text(real)) == label


def test_text_round_trip_and_bad_symbols():
    rng = random.Random(0)
    row = listops.generate(rng, 10, 80)
    assert listops.from_text(listops.to_text(row)) == row
    with pytest.raises(ValueError, match="'\\[AVG' is not a ListOps symbol"):
        listops.from_text("[AVG 1 2 ]")
    with pytest.raises(ValueError, match="min_len < max_len"):
        listops.generate(rng, 50, 50)
