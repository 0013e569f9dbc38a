"""`make run`: train a small byte-level Reformer on the default corpus for a few minutes, print a sample.

The default corpus is this Python's own standard library source (present on every machine, no
download). Usage: python scripts/quickstart.py [--minutes 3] [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from tqdm import tqdm

from reformer import ReformerConfig, ReformerLM
from reformer.data import decode_bytes, default_corpus, encode_text, random_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=6e-3)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = ReformerConfig(
        vocab_size=256, d_model=128, n_heads=4, n_layers=4, d_ff=512, bucket_size=32, n_hashes=2,
        attn_layers=("local", "lsh", "local", "lsh"), local_chunk_size=64, max_seq_len=args.seq_len,
        causal=True,
    )  # fmt: skip
    model = ReformerLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    train, test = default_corpus("train"), default_corpus("test")
    print(f"default corpus (Python standard library): {len(train):,} train / {len(test):,} held-out bytes")
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {config.n_layers} layers")

    generator = torch.Generator().manual_seed(args.seed)
    deadline = time.monotonic() + 60 * args.minutes
    step, bar = 0, tqdm(desc="training", unit="step")
    while time.monotonic() < deadline:
        lr = args.lr * min(1.0, (step + 1) / 50)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = random_windows(train, args.seq_len, args.batch_size, generator)
        loss = model.loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", bpb=f"{loss.item() / math.log(2):.2f}")
    bar.close()

    model.eval()
    with torch.no_grad():
        inputs, targets = random_windows(test, args.seq_len, 8, torch.Generator().manual_seed(1))
        held_out = model.loss(inputs, targets).item() / math.log(2)
    print(f"held-out bits per byte after {step} steps: {held_out:.3f}")
    model.save_pretrained(args.out)
    print(f"saved to {args.out}")
    prompt = "def main():\n    "
    sample = model.generate(encode_text(prompt)[None], max_new_tokens=200, temperature=0.8, top_k=40,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    print("sample:\n" + decode_bytes(sample[0]))


if __name__ == "__main__":
    main()
