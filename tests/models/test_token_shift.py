"""Token shift (``token_shift=True``): the embedding against its definition written out position by
position, padding invariance, cached decoding equal to recomputation (left-padded prompts too), a slice
continued from the token before it, and the conversions that refuse it."""

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.embeddings import shift_tokens
from reformer.hf import config_to_hf_dict
from reformer.models.seq2seq import Seq2SeqConfig


def test_second_half_of_each_position_comes_from_the_previous_token():
    x = torch.randn(2, 5, 7)
    before = torch.randn(2, 1, 7)
    for given in (None, before):
        out = shift_tokens(x, given)
        for t in range(5):
            assert torch.equal(out[:, t, :3], x[:, t, :3])
            previous = x[:, t - 1, 3:] if t else (torch.zeros(2, 4) if given is None else before[:, 0, 3:])
            assert torch.equal(out[:, t, 3:], previous)


def _config(**changes) -> ReformerConfig:
    settings = dict(
        vocab_size=31, d_model=32, n_heads=2, n_layers=3, d_ff=64, attn_layers=("local", "lsh", "full"),
        local_chunk_size=8, bucket_size=8, n_hashes=2, max_seq_len=128, position_embedding="rotary",
        token_shift=True, initializer_range=0.2,
    )  # fmt: skip
    return ReformerConfig(**{**settings, **changes})


def test_model_embedding_equals_the_definition_and_changes_the_outputs():
    torch.manual_seed(0)
    model = ReformerLM(_config()).eval()
    ids = torch.randint(0, 31, (2, 20))
    table = model.embeddings.tokens.weight
    previous = torch.cat([torch.zeros(2, 1, 16), table[ids][:, :-1, 16:]], 1)
    expected = torch.cat([table[ids][..., :16], previous], -1)
    torch.testing.assert_close(model.embeddings(ids), expected)
    plain = ReformerLM(_config(token_shift=False)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(ids), model(ids))


def test_left_padding_leaves_real_outputs_unchanged():
    torch.manual_seed(1)
    model = ReformerLM(_config()).eval()
    row = torch.randint(0, 31, (1, 17))
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 17)], 1).long()
    with torch.no_grad():
        torch.testing.assert_close(
            model(padded, attention_mask=mask)[:, 6:], model(row), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("key_rule", ["own_bucket", "chunks"])
def test_cached_decoding_equals_recomputation(key_rule):
    """With ``chunks`` cached decoding is exact for sequences within one LSH chunk: prompts of 3-5 tokens
    and 3 new ones stay inside a chunk of 8."""
    torch.manual_seed(2)
    model = ReformerLM(_config(lsh_key_rule=key_rule)).eval()
    prompt = torch.randint(1, 31, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    new = 20 if key_rule == "own_bucket" else 3
    for attention_mask in (None, mask):
        cached = model.generate(prompt, new, temperature=0, attention_mask=attention_mask, use_cache=True)
        recomputed = model.generate(
            prompt, new, temperature=0, attention_mask=attention_mask, use_cache=False
        )
        assert torch.equal(cached, recomputed)


def test_conversions_that_cannot_hold_it_refuse_it():
    with pytest.raises(ValueError, match="no token shift"):
        config_to_hf_dict(_config(attn_layers=("local", "lsh", "local"), lsh_key_rule="chunks",
                                  position_embedding="axial"))  # fmt: skip
    with pytest.raises(ValueError, match="token_shift"):
        Seq2SeqConfig(_config(causal=False, lsh_key_rule="chunks"), _config())
    with pytest.raises(ValueError, match="token_shift=1"):
        _config(token_shift=1)
