"""The passkey and associative-recall generators, checked by evaluators written here from the tasks'
definitions: the text of a passkey example parsed back (needle, depth, question, scored digits), and a
recall example's pairs, queries and filler read back token by token."""

import re

import pytest
import torch

from reformer.data import IGNORE_INDEX
from reformer.tasks.passkey import Filler, min_passkey_length, passkey_example
from reformer.tasks.recall import query_gaps, recall_example

NEEDLE_RE = re.compile(rb"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\. ")


def _parse_passkey(inputs: torch.Tensor, targets: torch.Tensor):
    text = bytes(inputs.tolist()) + bytes([int(targets[-1])])
    needles = list(NEEDLE_RE.finditer(text))
    assert len(needles) == 1, "exactly one needle"
    needle = needles[0]
    assert needle.group(1) == needle.group(2)
    question = b"What is the pass key? The pass key is "
    assert text.endswith(question + needle.group(1))
    assert text.lower().count(b"pass key") == 4, "the phrase occurs in the needle and question only"
    return needle, text


@pytest.mark.parametrize("kind", ["corpus", "repeat", "noise"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_example_holds_one_needle_at_its_depth_and_scores_the_key(kind, depth):
    length = 700
    inputs, targets = passkey_example(length, depth, Filler(kind), torch.Generator().manual_seed(3))
    assert inputs.shape == targets.shape == (length,) and inputs.dtype == torch.long
    needle, text = _parse_passkey(inputs, targets)
    key = needle.group(1)
    scored = targets != IGNORE_INDEX
    assert scored.sum() == 5 and bool(scored[-5:].all())
    assert bytes(targets[-5:].tolist()) == key
    assert bytes(inputs[-4:].tolist()) == key[:4], "teacher forced: the input holds all digits but the last"
    filler = len(text) - len(needle.group(0)) - len(b"What is the pass key? The pass key is ") - 5
    assert abs(needle.start() - depth * filler) <= 1


def test_passkey_examples_differ_and_follow_the_generator():
    a = passkey_example(300, 0.5, Filler("noise"), torch.Generator().manual_seed(1))
    b = passkey_example(300, 0.5, Filler("noise"), torch.Generator().manual_seed(1))
    c = passkey_example(300, 0.5, Filler("noise"), torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_corpus_filler_never_holds_the_phrase():
    filler = Filler("corpus", "test")
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert b"pass key" not in filler.take(5000, generator).tobytes().lower()


def test_bad_passkey_settings_are_named():
    with pytest.raises(ValueError, match="too short"):
        passkey_example(min_passkey_length() - 1, 0.5, Filler("noise"), torch.Generator())
    passkey_example(min_passkey_length(), 0.5, Filler("noise"), torch.Generator())
    with pytest.raises(ValueError, match="depth"):
        passkey_example(500, 1.5, Filler("noise"), torch.Generator())
    with pytest.raises(ValueError, match="filler='hay' is unknown"):
        Filler("hay")


@pytest.mark.parametrize(("length", "n_pairs", "vocab"), [(64, 8, 40), (1000, 64, 8192), (257, 64, 130)])
def test_recall_example_pairs_queries_and_filler(length, n_pairs, vocab):
    inputs, targets = recall_example(length, n_pairs, vocab, torch.Generator().manual_seed(5))
    assert inputs.shape == targets.shape == (length,)
    half = vocab // 2
    keys, values = inputs[0 : 2 * n_pairs : 2].tolist(), inputs[1 : 2 * n_pairs : 2].tolist()
    assert len(set(keys)) == n_pairs and all(1 <= k < half for k in keys)
    assert len(set(values)) == n_pairs and all(half <= v < vocab for v in values)
    value_of = dict(zip(keys, values, strict=True))
    scored = [t for t in range(length) if targets[t] != IGNORE_INDEX]
    assert len(scored) == n_pairs
    assert sorted(int(inputs[t]) for t in scored) == sorted(keys), "every key is queried once"
    for t in scored:
        assert t >= 2 * n_pairs and (t - 2 * n_pairs) % 2 == 0
        assert int(targets[t]) == value_of[int(inputs[t])]
    rest = [int(inputs[t]) for t in range(2 * n_pairs, length) if t not in scored]
    assert not set(rest) & set(keys), "no key in the filler"
    assert all(0 < x < vocab for x in rest)


def test_recall_gaps_follow_the_power_law():
    """p(g) ~ g**-0.99 over 1..space: the first 10% of the gaps hold far more than 10% of the queries
    (for this law about 80% at space 2,000), the generator's seeds vary them."""
    generator = torch.Generator().manual_seed(0)
    gaps = torch.cat([query_gaps(recall_example(4096, 16, 8192, generator)[1], 16) for _ in range(200)])
    space = (4096 - 32) // 2
    assert ((gaps // 2) < space // 10).float().mean() > 0.6
    assert gaps.max() > space


def test_bad_recall_settings_are_named():
    with pytest.raises(ValueError, match="need at least 256 tokens"):
        recall_example(200, 64, 8192, torch.Generator())
    with pytest.raises(ValueError, match="vocabulary of at least"):
        recall_example(4096, 64, 100, torch.Generator())
    with pytest.raises(ValueError, match="power_a"):
        recall_example(4096, 8, 8192, torch.Generator(), power_a=0)


def test_zeroed_lsh_outputs_equal_a_model_whose_lsh_projections_are_zero():
    import copy

    from reformer import ReformerConfig, ReformerLM
    from reformer.tasks.context_probe import lsh_outputs_zeroed

    torch.manual_seed(0)
    cfg = ReformerConfig(
        vocab_size=20, d_model=16, n_heads=2, n_layers=3, d_ff=32, attn_layers=("local", "lsh", "local"),
        bucket_size=8, local_chunk_size=8, max_seq_len=64, position_embedding="rotary", initializer_range=0.2,
    )  # fmt: skip
    model = ReformerLM(cfg).eval()
    zeroed = copy.deepcopy(model)
    torch.nn.init.zeros_(zeroed.layers.blocks[1].attention.to_out.weight)
    ids = torch.randint(0, 20, (2, 40))
    with torch.no_grad(), lsh_outputs_zeroed(model) as n:
        ablated = model(ids)
    assert n == 1
    with torch.no_grad():
        torch.testing.assert_close(ablated, zeroed(ids))
        assert not torch.allclose(model(ids), ablated), "the hook is removed on leaving"


def test_last_window_keeps_the_scored_positions():
    from reformer.tasks.context_probe import last_window

    inputs = torch.arange(20)[None]
    targets = torch.full((1, 20), IGNORE_INDEX)
    targets[0, -3:] = 1
    cut_inputs, cut_targets = last_window(inputs, targets, 5)
    assert cut_inputs.tolist() == [[15, 16, 17, 18, 19]] and int((cut_targets >= 0).sum()) == 3
    with pytest.raises(ValueError, match="cuts off scored positions"):
        last_window(inputs, targets, 2)


def test_heatmap_is_a_png(tmp_path):
    from reformer.tasks.context_probe import plot_heatmap

    path = tmp_path / "heat.png"
    plot_heatmap([[1.0, 0.5], [0.0, float("nan")]], [4096, 1 << 20], [0.0, 1.0], path, "passkey")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("length, decoys, expected", [(700, 6, 6), (120, 6, 2)])
def test_passkey_decoys_share_a_prefix_with_the_key_and_never_equal_it(length, decoys, expected):
    shared = set()
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        inputs, targets = passkey_example(length, 0.5, Filler("repeat"), generator, decoys=decoys)
        assert inputs.shape == targets.shape == (length,)
        needle, text = _parse_passkey(inputs, targets)
        key = needle.group(1)
        numbers = re.findall(rb" (\d{5}) ", text.replace(needle.group(0), b""))
        assert len(numbers) == expected, "one decoy per stretch of filler, as many as fit"
        assert all(n != key for n in numbers)
        shared |= {next(i for i in range(5) if n[i] != key[i]) for n in numbers}
        assert bytes(targets[-5:].tolist()) == key
    assert shared == {0, 1, 2, 3, 4}, "prefixes of every length below the key's"


def test_passkey_decoys_are_in_training_haystacks_only():
    from reformer.train.config import TrainConfig

    cfg = TrainConfig(task="passkey", seq_len=1024, task_settings={"filler": "repeat", "train_decoys": 4})
    task = cfg.make_task()
    for split, expected in (("train", 4), ("valid", 0), ("test", 0)):
        inputs, targets = task.example(600, 0.5, torch.Generator().manual_seed(1), split)
        needle, text = _parse_passkey(inputs, targets)
        assert len(re.findall(rb" \d{5} ", text.replace(needle.group(0), b""))) == expected, split
    with pytest.raises(ValueError, match="--train-decoys -1"):
        TrainConfig(task="passkey", seq_len=4096, task_settings={"train_decoys": -1}).make_task().validate()


def test_passkey_decoys_start_at_the_decoys_from_length():
    from reformer.train.config import TrainConfig

    settings = {"filler": "repeat", "train_decoys": 4, "decoys_from": 600}
    task = TrainConfig(task="passkey", seq_len=1024, task_settings=settings).make_task()
    for length, expected in ((599, 0), (600, 4), (900, 4)):
        inputs, targets = task.example(length, 0.5, torch.Generator().manual_seed(2), "train")
        needle, text = _parse_passkey(inputs, targets)
        assert len(re.findall(rb" \d{5} ", text.replace(needle.group(0), b""))) == expected, length
    with pytest.raises(ValueError, match="--decoys-from -1"):
        TrainConfig(task="passkey", seq_len=4096, task_settings={"decoys_from": -1}).make_task().validate()
