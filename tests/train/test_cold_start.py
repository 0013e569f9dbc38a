"""No cold start: eager forward and backward passes never import the compiler stack (torch._dynamo, or
sympy through it), which costs a process's first call one to two seconds."""

import subprocess
import sys

SCRIPT = r"""
import sys
import torch
import reformer

heavy = ("torch._dynamo", "torch._inductor", "sympy")
assert not [m for m in heavy if m in sys.modules], "imported before any call"
torch.manual_seed(0)
for n_buckets, rule in ((None, "chunks"), (8, "own_bucket")):  # both rotation draws
    cfg = reformer.ReformerConfig(
        vocab_size=32, d_model=32, n_heads=2, n_layers=3, d_ff=64, bucket_size=8, n_hashes=2,
        n_buckets=n_buckets, lsh_key_rule=rule, max_seq_len=64, attn_layers=("lsh", "local", "full"),
        local_chunk_size=16, dropout=0.1, attn_dropout=0.1,
    )
    model = reformer.ReformerLM(cfg)
    ids = torch.randint(0, 32, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    model(ids, attention_mask=mask, targets=ids.roll(-1, 1)).backward()  # training: reversible, chunked loss
    model.eval()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    model(ids, targets=ids.roll(-1, 1)).backward()  # eval mode with gradients
    list(model.generate(ids[:1, :5], max_new_tokens=3, temperature=0.0))
enc = reformer.ReformerForSequenceClassification(
    reformer.ReformerConfig(vocab_size=32, d_model=32, n_heads=2, n_layers=2, d_ff=64, bucket_size=8,
                            causal=False, max_seq_len=64, attn_layers=("lsh", "local")), n_labels=3)
enc(ids, labels=torch.tensor([0, 2])).backward()
from reformer.models.seq2seq import ReformerEncoderDecoder, Seq2SeqConfig
common = dict(d_model=32, n_heads=2, d_ff=48, max_seq_len=64, bucket_size=8, local_chunk_size=8)
for cross in ("full", "lsh"):
    s2s = ReformerEncoderDecoder(Seq2SeqConfig(
        reformer.ReformerConfig(vocab_size=23, n_layers=1, attn_layers=("lsh",), causal=False, **common),
        reformer.ReformerConfig(vocab_size=23, n_layers=2, attn_layers=("lsh", "local"), **common),
        cross_attention=cross, cross_chunk_size=4, cross_window=8))
    s2s.loss(torch.randint(1, 23, (2, 29)), torch.randint(1, 23, (2, 21))).backward()
found = [m for m in heavy if m in sys.modules]
assert not found, f"eager calls imported {found}"
print("ok")
"""


def test_eager_calls_do_not_import_the_compiler_stack():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=None
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
