"""Why a passkey model answers what it answers at one length and depth: its predicted digits with the
probability of each true digit, and, in every LSH layer and head, how the query that predicts each digit
sees the needle's digit that answers it.

For each LSH layer and head the input of the layer is captured, the shared query/key vectors are formed
with the layer's own projection, and for the query of answer digit ``j`` (the question's last tokens) it
prints the cosine to the needle's digit ``j``, the positions most alike (the needle and any rival),
and, over ``--rounds`` draws of random rotations of the layer's bucket count (the model's hashing
distribution), in how many rounds the needle shares the query's bucket and how many tokens of that bucket
lie between them (a chunk sees about ``bucket_size`` of them).

    PYTHONPATH=src python benchmarks/passkey_diagnosis.py RUN --length 262144 --depth 0 --n-hashes 16
    PYTHONPATH=src python benchmarks/passkey_diagnosis.py RUN --length 262144 --depth 0 --filler repeat
"""

from __future__ import annotations

import argparse
import time

import torch

from reformer.attention.lsh import LSHSelfAttention
from reformer.hashing import auto_n_buckets, draw_rotations, hash_vectors
from reformer.tasks.passkey import FILLERS, QUESTION
from reformer.tasks.retrieval import TEST_SEED
from reformer.train.runs import load_run

NEEDLE_KEY = b"The pass key is "


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a passkey run folder")
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--depth", type=float, default=0.0)
    p.add_argument("--filler", choices=FILLERS, help="haystack text (default: the run's)")
    p.add_argument("--n-hashes", type=int, default=16, help="LSH rounds of the model's forward pass")
    p.add_argument("--rounds", type=int, default=16, help="rotation draws for the bucket statistics")
    p.add_argument("--seed", type=int, default=TEST_SEED, help="the example's generator seed")
    args = p.parse_args()

    _, task, model = load_run(args.run)
    model.eval()
    if args.filler:
        task.settings.filler = args.filler
    inputs, targets = task.example(args.length, args.depth, torch.Generator().manual_seed(args.seed), "test")
    inputs, targets = inputs[None], targets[None]
    layers = [m for m in model.modules() if isinstance(m, LSHSelfAttention)]
    captured: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda _m, a, i=i: captured.__setitem__(i, a[0].detach()))

    started = time.perf_counter()
    with torch.no_grad():
        hidden = model.hidden_states(inputs, n_hashes=args.n_hashes)
        probs = model.lm_head(hidden[0, -task.settings.digits :]).float().softmax(-1)
    want = bytes(targets[0, -task.settings.digits :].tolist())
    got = bytes(probs.argmax(-1).tolist())
    p_true = " ".join(f"{float(probs[j, d]):.3f}" for j, d in enumerate(want))
    seconds = time.perf_counter() - started
    print(f"length {args.length:,}, depth {args.depth:g}, filler {task.settings.filler}: predicted "
          f"{got.decode()}, key {want.decode()}, p(true digit) {p_true}  ({seconds:.0f} s)")  # fmt: skip

    text = bytes(inputs[0].tolist())
    first_digit = text.index(NEEDLE_KEY) + len(NEEDLE_KEY)
    question = text.rindex(QUESTION.encode())
    for i, layer in enumerate(layers):
        with torch.no_grad():
            qk = layer.split_heads(layer.to_qk(captured[i]))[0]  # (heads, length, head_dim)
        unit = torch.nn.functional.normalize(qk.float(), dim=-1)
        padded = -(-args.length // layer.bucket_size) * layer.bucket_size
        n_buckets = layer.n_buckets or auto_n_buckets(padded, layer.bucket_size)
        rotations = draw_rotations(qk.shape[0], qk.shape[-1], args.rounds, n_buckets, seed=1)
        buckets = hash_vectors(qk[None], rotations, n_buckets)[0]  # (heads, rounds, length)
        for head in range(qk.shape[0]):
            for j in range(len(want)):
                query, needle = args.length - len(want) + j, first_digit + j
                cos = unit[head] @ unit[head, query]
                cos[question:] = -2  # rivals in the haystack, not the question's own tokens
                top = torch.topk(cos, 3)
                pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
                rivals = ", ".join(f"{t}:{v:.2f}" for t, v in pairs)
                same = buckets[head] == buckets[head, :, query : query + 1]  # (rounds, length)
                shared = same[:, needle]
                between = same[shared, needle + 1 : query].sum(-1).tolist()
                print(f"LSH layer {i} head {head} digit {j}: cos(query, needle) {float(cos[needle]):.2f}; "
                      f"most alike {rivals}; needle in the query's bucket in {int(shared.sum())}/"
                      f"{args.rounds} rounds, with {sorted(between)[:8]} tokens of it between")  # fmt: skip


if __name__ == "__main__":
    main()
