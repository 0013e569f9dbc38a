"""The encoder heads against HF transformers' ReformerForMaskedLM / ...ForSequenceClassification /
...ForQuestionAnswering on the same weights and rotations: float64, init std 0.2 (so attention shapes
the outputs), logits, losses and the gradient of every named parameter."""

import pytest
import torch

import reformer
from reformer.hf import name_map
from tests.models.test_hf import hf_float32_rotations  # noqa: F401 (a fixture)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("hf_float32_rotations")  # both libraries hash with the same rotations

CASES = [
    (("lsh", "lsh"), 4, 2),
    (("lsh", "local", "lsh"), 4, 1),
    (("local", "lsh"), [2, 4], 3),
]
OURS = {
    "ReformerForMaskedLM": reformer.ReformerForMaskedLM,
    "ReformerForSequenceClassification": reformer.ReformerForSequenceClassification,
    "ReformerForQuestionAnswering": reformer.ReformerForQuestionAnswering,
}


def hf_head(cls_name, layers=("lsh", "lsh"), num_buckets=4, num_hashes=2, **overrides):
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=40, hidden_size=32, num_attention_heads=2, attention_head_size=16,
        attn_layers=list(layers), axial_pos_shape=[8, 8], axial_pos_embds_dim=[16, 16],
        max_position_embeddings=64, feed_forward_size=64, lsh_attn_chunk_length=8, local_attn_chunk_length=8,
        num_buckets=num_buckets, num_hashes=num_hashes, is_decoder=False, hash_seed=3,
        hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
        pad_token_id=0, eos_token_id=None, hidden_act="gelu", initializer_range=0.2,
    )  # fmt: skip
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(transformers.ReformerConfig(**kwargs))


def run_both(cls_name, hf, ids, labels):
    """(hf outputs, hf loss, our outputs, our loss) for one forward+backward in float64 train mode."""
    ours = OURS[cls_name].from_hf(hf).double().train()
    hf = hf.double().train()
    if cls_name == "ReformerForQuestionAnswering":
        start, end = labels
        out = hf(input_ids=ids, start_positions=start, end_positions=end)
        hf_logits = torch.stack([out.start_logits, out.end_logits], -1)
        our_logits = torch.stack(ours(ids), -1)
        loss = ours(ids, start_positions=start, end_positions=end)
    else:
        out = hf(input_ids=ids, labels=labels)
        hf_logits, our_logits, loss = out.logits, ours(ids), ours(ids, labels=labels)
    out.loss.backward()
    loss.backward()
    return hf, out.loss, hf_logits, ours, loss, our_logits


def assert_equal_to_hf(cls_name, hf, ids, labels):
    hf, hf_loss, hf_logits, ours, loss, logits = run_both(cls_name, hf, ids, labels)
    assert logits.std() > 0.1  # far from zero: init std 0.2 (the gradients of attention are checked below)
    assert (logits - hf_logits).abs().max() < 1e-9
    assert abs(loss.item() - hf_loss.item()) < 1e-10
    theirs = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    mapping = name_map(ours.config, ours.head_kind)
    assert mapping.keys() == ours_params.keys()
    for ours_name, hf_name in mapping.items():
        expected, got = theirs[hf_name].grad, ours_params[ours_name].grad
        if hf_name == "lm_head.bias" and expected is None:  # the bias HF's forward uses is the decoder's
            expected = theirs["lm_head.decoder.bias"].grad
        # + 1e-14: some gradients are zero in exact arithmetic (QA's softmax over positions ignores
        # final_norm.bias), so both sides hold rounding noise there
        assert (got - expected).abs().max() <= 1e-9 * expected.abs().max() + 1e-14, ours_name
    return ours


def _ids(length=64, seed=2):
    return torch.randint(1, 40, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("layers", "num_buckets", "num_hashes"), CASES)
def test_masked_lm_equals_hf(layers, num_buckets, num_hashes):
    ids = _ids()
    labels = torch.full_like(ids, -100)
    labels[:, ::5] = ids[:, ::5]
    assert_equal_to_hf("ReformerForMaskedLM", hf_head("ReformerForMaskedLM", layers, num_buckets, num_hashes),
                       ids, labels)  # fmt: skip


@pytest.mark.parametrize(("layers", "num_buckets", "num_hashes"), CASES)
@pytest.mark.parametrize("n_labels", [3, 1])
def test_sequence_classification_and_regression_equal_hf(layers, num_buckets, num_hashes, n_labels):
    ids = _ids()
    labels = torch.tensor([2, 0]) if n_labels > 1 else torch.tensor([0.5, -1.5], dtype=torch.float64)
    hf = hf_head("ReformerForSequenceClassification", layers, num_buckets, num_hashes, num_labels=n_labels)
    ours = assert_equal_to_hf("ReformerForSequenceClassification", hf, ids, labels)
    expected = "regression" if n_labels == 1 else "single_label_classification"
    assert (ours.n_labels, ours.problem_type) == (n_labels, expected)


@pytest.mark.parametrize(("layers", "num_buckets", "num_hashes"), CASES)
def test_question_answering_equals_hf(layers, num_buckets, num_hashes):
    hf = hf_head("ReformerForQuestionAnswering", layers, num_buckets, num_hashes)
    assert_equal_to_hf(
        "ReformerForQuestionAnswering", hf, _ids(), (torch.tensor([3, 40]), torch.tensor([9, 41]))
    )


@pytest.mark.parametrize("cls_name", list(OURS))
@pytest.mark.parametrize("length", [45, 61])
def test_ragged_lengths_eval_logits_equal_hf(cls_name, length):
    hf = hf_head(cls_name, ("lsh", "local", "lsh"), 4, 2).double().eval()
    ours = OURS[cls_name].from_hf(hf).double().eval()
    ids = _ids(length, seed=1)
    with torch.no_grad():
        out = hf(input_ids=ids)
        if cls_name == "ReformerForQuestionAnswering":
            expected, got = torch.stack([out.start_logits, out.end_logits]), torch.stack(ours(ids))
        else:
            expected, got = out.logits, ours(ids)
    assert (got - expected).abs().max() < 1e-9


@pytest.mark.parametrize("cls_name", list(OURS))
def test_round_trip_ours_hf_ours_is_lossless(cls_name):
    torch.manual_seed(0)
    cfg = reformer.ReformerConfig(
        vocab_size=30, d_model=32, n_heads=2, n_layers=2, d_ff=48, attn_layers=("local", "lsh"), causal=False,
        bucket_size=8, n_buckets=(2, 4), n_hashes=2, hash_seed=5, max_seq_len=64, local_chunk_size=16,
    )  # fmt: skip
    kwargs = {"n_labels": 4, "classifier_dropout": 0.1} if "Sequence" in cls_name else {}
    ours = OURS[cls_name](cfg, **kwargs)
    hf = ours.to_hf()
    assert type(hf).__name__ == cls_name
    back = OURS[cls_name].from_hf(hf)
    assert back.config == cfg and back.head_settings() == ours.head_settings()
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_conversion_refusals_are_clear():
    with pytest.raises(ValueError, match="is_decoder=True"):
        reformer.ReformerForMaskedLM.from_hf(hf_head("ReformerModelWithLMHead", is_decoder=True))
    cfg = reformer.ReformerConfig(
        vocab_size=30, d_model=32, n_heads=2, n_layers=1, max_seq_len=64, causal=False
    )
    with pytest.raises(ValueError, match="pooling='mean', which it cannot express"):
        reformer.ReformerForSequenceClassification(cfg, pooling="mean").to_hf()
    for cls in (reformer.ReformerForTokenClassification, reformer.ReformerEncoder):
        with pytest.raises(ValueError, match="HF"):
            cls(cfg).to_hf()
        with pytest.raises(ValueError, match="no HF transformers counterpart"):
            cls.from_hf(hf_head("ReformerForMaskedLM"))
