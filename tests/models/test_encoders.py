"""The bidirectional encoder family: shapes, padding invariance with default settings, reversible ==
ordinary residual gradients, losses against cross-entropy written out, checkpoints (round trips, trunk
weights into any head, causal checkpoints refused) and errors for bad labels."""

import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F

import reformer
from reformer import (
    ReformerConfig,
    ReformerEncoder,
    ReformerForMaskedLM,
    ReformerForQuestionAnswering,
    ReformerForSequenceClassification,
    ReformerForTokenClassification,
    ReformerLM,
)
from tests.models.test_padding import LENGTHS, _batch

HEADS = {
    "encoder": (ReformerEncoder, {}),
    "masked_lm": (ReformerForMaskedLM, {}),
    "sequence_classification": (ReformerForSequenceClassification, {"n_labels": 3}),
    "regression": (ReformerForSequenceClassification, {"n_labels": 1}),
    "mean_pooling": (ReformerForSequenceClassification, {"n_labels": 3, "pooling": "mean"}),
    "token_classification": (ReformerForTokenClassification, {"n_labels": 5}),
    "question_answering": (ReformerForQuestionAnswering, {}),
}


def small_config(**overrides) -> ReformerConfig:
    kwargs = dict(
        vocab_size=50, d_model=32, n_heads=2, n_layers=4, d_ff=64, bucket_size=8, n_hashes=2,
        max_seq_len=128, local_chunk_size=16, attn_layers=("lsh", "local", "full", "lsh"), causal=False,
        initializer_range=0.2,
    )  # fmt: skip
    kwargs.update(overrides)
    return ReformerConfig(**kwargs)


def make(name, **overrides):
    torch.manual_seed(0)
    cls, kwargs = HEADS[name]
    return cls(small_config(**overrides), **kwargs)


def outputs(model, ids, mask=None):
    """Per-position outputs ``(batch, length, ...)`` and per-row outputs ``(batch, ...)`` of any head."""
    out = model(ids, attention_mask=mask)
    if isinstance(model, ReformerForQuestionAnswering):
        return torch.stack(out, -1), None
    if isinstance(model, ReformerForSequenceClassification):
        return None, out
    return out, None


@pytest.mark.parametrize("name", list(HEADS))
def test_output_shapes(name):
    model = make(name).eval()
    ids = torch.randint(0, 50, (3, 37))
    per_position, per_row = outputs(model, ids)
    expected = {
        "encoder": (3, 37, 64),
        "masked_lm": (3, 37, 50),
        "token_classification": (3, 37, 5),
        "question_answering": (3, 37, 2),
    }
    if per_row is not None:
        assert per_row.shape == (3, model.n_labels)
    else:
        assert per_position.shape == expected[name]


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize("name", list(HEADS))
def test_each_row_equals_the_row_alone_with_default_settings(name, layout):
    """n_buckets=None, no hash_seed: a row's real outputs do not depend on the padding or on the other
    rows; sequence classification reads each row's first real token; QA never picks padding."""
    model = make(name).eval()
    assert model.config.n_buckets is None and model.config.hash_seed is None
    rows, ids, mask = _batch(layout)
    with torch.no_grad():
        per_position, per_row = outputs(model, ids, mask)
        for i, row in enumerate(rows):
            alone_position, alone_row = outputs(model, row[None])
            if per_row is not None:
                torch.testing.assert_close(per_row[i], alone_row[0], atol=1e-5, rtol=0)
            else:
                torch.testing.assert_close(per_position[i][mask[i]], alone_position[0], atol=1e-5, rtol=0)
    if name == "question_answering":
        assert (per_position[~mask] == torch.finfo(per_position.dtype).min).all()


@pytest.mark.parametrize("name", ["sequence_classification", "question_answering", "masked_lm"])
def test_reversible_gradients_equal_ordinary_residuals(name):
    """float64, padding in the batch: the reversible stack's backward (recomputing activations) gives
    the gradients of the same weights in an ordinary residual stack."""
    rows, ids, mask = _batch("left")
    grads = []
    for reversible in (True, False):
        model = make(name, reversible=reversible, hash_seed=4).double().train()
        if name == "sequence_classification":
            loss = model(ids, mask, labels=torch.tensor([0, 2, 1, 2]))
        elif name == "question_answering":
            starts = mask.to(torch.uint8).argmax(1)
            loss = model(ids, mask, start_positions=starts, end_positions=starts + 3)
        else:
            loss = model(ids, mask, labels=torch.where(torch.rand(ids.shape) < 0.3, ids, -100))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], atol=1e-10, rtol=1e-8, msg=n)


def test_losses_equal_cross_entropy_written_out():
    rows, ids, mask = _batch("right")
    real = mask.bool()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        mlm = make("masked_lm").eval()
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
        logits = mlm(ids, mask)
        keep = real & (labels != -100)
        expected = F.cross_entropy(logits[keep], labels[keep])
        torch.testing.assert_close(mlm(ids, mask, labels=labels), expected)

        tok = make("token_classification").eval()
        labels = torch.randint(0, 5, ids.shape, generator=g)
        logits = tok(ids, mask)
        torch.testing.assert_close(tok(ids, mask, labels=labels), F.cross_entropy(logits[real], labels[real]))

        cls = make("sequence_classification").eval()
        labels = torch.tensor([2, 0, 1, 1])
        torch.testing.assert_close(cls(ids, mask, labels=labels), F.cross_entropy(cls(ids, mask), labels))
        reg = make("regression").eval()
        targets = torch.randn(4, generator=g)
        torch.testing.assert_close(
            reg(ids, mask, labels=targets), ((reg(ids, mask)[:, 0] - targets) ** 2).mean()
        )

        qa = make("question_answering").eval()
        start, end = qa(ids, mask)
        s, e = torch.tensor([0, 3, 10, -100]), torch.tensor([2, 28, 70, -100])
        expected = (F.cross_entropy(start[:3], s[:3]) + F.cross_entropy(end[:3], e[:3])) / 2
        # the softmax over a row covers its real positions only
        alone = torch.log_softmax(start[1, : LENGTHS[1]], 0)[3]
        torch.testing.assert_close(-torch.log_softmax(start[1], 0)[3], -alone)
        torch.testing.assert_close(qa(ids, mask, start_positions=s, end_positions=e), expected)


@pytest.mark.parametrize("name", list(HEADS))
def test_save_and_load_round_trip(tmp_path, name):
    model = make(name).eval()
    model.save_pretrained(tmp_path)
    head = json.loads((tmp_path / "head.json").read_text())
    assert head == {"head": model.head_kind, **model.head_settings()}
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config == model.config and loaded.head_settings() == model.head_settings()
    ids = torch.randint(0, 50, (2, 40))
    for a, b in zip(outputs(model, ids), outputs(loaded, ids), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_mean_pooling_reads_the_mean_of_each_rows_real_states(tmp_path):
    """The oracle: each row alone through the trunk, the mean of its final states written out as a sum
    over positions divided by the row's length, then the head's layers."""
    model = make("mean_pooling").eval()
    rows, ids, mask = _batch("right")
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, row in enumerate(rows):
            states = model.hidden_states(row[None])[0]
            mean = sum(states[t] for t in range(len(row))) / len(row)
            head = model.classifier
            expected = head.out_proj(torch.tanh(head.dense(mean)))
            torch.testing.assert_close(batched[i], expected, atol=1e-5, rtol=0)
        first = make("sequence_classification").eval()
        first.load_state_dict(model.state_dict())
        assert not torch.allclose(first(ids, attention_mask=mask), batched, atol=1e-3)
    # Only a non-default pooling is written to head.json: classifiers saved before the option load whole.
    make("sequence_classification").save_pretrained(tmp_path / "first")
    assert "pooling" not in json.loads((tmp_path / "first" / "head.json").read_text())
    with pytest.raises(ValueError, match="pooling='max' is unknown"):
        ReformerForSequenceClassification(small_config(), pooling="max")


def _trunk(model):
    return {
        k: v for k, v in model.state_dict().items() if k.startswith(("embeddings.", "layers.", "final_norm."))
    }


@pytest.mark.parametrize("name", list(HEADS))
def test_encoder_weights_load_into_every_head_with_a_fresh_head(tmp_path, caplog, name):
    torch.manual_seed(1)
    encoder = ReformerEncoder(small_config())
    encoder.save_pretrained(tmp_path)
    cls, kwargs = HEADS[name]
    torch.manual_seed(0)
    fresh = cls(small_config(), **kwargs)
    with caplog.at_level(logging.WARNING, logger="reformer"):
        torch.manual_seed(0)
        model = cls.from_pretrained(tmp_path, **kwargs)
    for k, v in _trunk(encoder).items():
        assert torch.equal(model.state_dict()[k], v), k
    head = {k: v for k, v in model.state_dict().items() if k not in _trunk(model)}
    for k, v in head.items():  # the head is a fresh initialisation, not something from the checkpoint
        assert torch.equal(v, fresh.state_dict()[k]), k
    if name == "encoder":
        assert not caplog.records
    else:
        [record] = caplog.records
        assert "initialised fresh" in record.getMessage()
        assert all(k in record.getMessage() for k in head)


def test_other_head_settings_and_other_heads_give_a_fresh_head(tmp_path, caplog):
    classifier = make("sequence_classification")
    classifier.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="reformer"):
        same = ReformerForSequenceClassification.from_pretrained(tmp_path)
        assert not caplog.records
        assert torch.equal(same.classifier.out_proj.weight, classifier.classifier.out_proj.weight)
        five = ReformerForSequenceClassification.from_pretrained(tmp_path, n_labels=5)
        assert five.n_labels == 5 and "classifier.out_proj.weight" in caplog.records[-1].getMessage()
        lm = ReformerLM.from_pretrained(tmp_path)  # an LM on an encoder's trunk (stays bidirectional)
        assert "lm_head.weight" in caplog.records[-1].getMessage() and not lm.config.causal
    for k, v in _trunk(classifier).items():
        assert torch.equal(five.state_dict()[k], v) and torch.equal(lm.state_dict()[k], v)
    lm.save_pretrained(tmp_path)  # an LM checkpoint has no head.json (the original format)
    assert not (tmp_path / "head.json").exists()


def test_causal_checkpoints_are_refused_unless_allowed(tmp_path, caplog):
    ReformerLM(small_config(causal=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="causal.*allow_causal=True"):
        ReformerForMaskedLM.from_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="reformer"):
        model = ReformerForMaskedLM.from_pretrained(tmp_path, allow_causal=True)
    assert not model.config.causal
    assert any("trained one-directional" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="causal=False"):
        ReformerForQuestionAnswering(small_config(causal=True))


def test_bad_head_settings_and_labels_are_named():
    with pytest.raises(ValueError, match="n_labels=0"):
        ReformerForSequenceClassification(small_config(), n_labels=0)
    with pytest.raises(ValueError, match="problem_type='ranking'"):
        ReformerForSequenceClassification(small_config(), problem_type="ranking")
    with pytest.raises(ValueError, match="n_labels=1 is regression"):
        ReformerForSequenceClassification(
            small_config(), n_labels=1, problem_type="single_label_classification"
        )
    with pytest.raises(ValueError, match="classifier_dropout"):
        ReformerForTokenClassification(small_config(), classifier_dropout=1.5)
    ids = torch.randint(0, 50, (2, 20))
    cls = make("sequence_classification")
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cls(ids, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\).*found 3"):
        cls(ids, labels=torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="integer class ids"):
        cls(ids, labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="row 1 of attention_mask has no real token"):
        cls(ids, torch.tensor([[1] * 20, [0] * 20]))
    with pytest.raises(TypeError, match="float labels"):
        make("regression")(ids, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="regression labels"):
        make("regression")(ids, labels=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\[0, 50\).*found 50"):
        make("masked_lm")(ids, labels=torch.full_like(ids, 50))
    with pytest.raises(ValueError, match="shape"):
        make("token_classification")(ids, labels=torch.zeros(2, 19, dtype=torch.long))
    qa = make("question_answering")
    with pytest.raises(ValueError, match=r"start_positions must lie in \[0, 20\)"):
        qa(ids, start_positions=torch.tensor([0, 20]), end_positions=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="both"):
        qa(ids, start_positions=torch.tensor([0, 1]))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with pytest.raises(ValueError, match="end_positions point at padding"):
        qa(ids, mask, start_positions=torch.tensor([0, 1]), end_positions=torch.tensor([1, 12]))


def test_trunk_names_are_shared_with_the_lm():
    lm, mlm = ReformerLM(small_config()), ReformerForMaskedLM(small_config())
    assert lm.state_dict().keys() == mlm.state_dict().keys()
    assert dataclasses.replace(small_config()).causal is False
    assert reformer.ReformerEncoder is ReformerEncoder
