"""Cold start: what the first call of a fresh process costs over the second, and a one-shot command's
time over the process's own import time.

For each row a fresh process imports ``reformer``, builds the benchmark model (byte-level LM, 6 LSH
layers, d_model 256, d_ff 1024, 2 hashes) and times three calls in a row: the eval forward without
gradients, or the training step (forward + backward). ``first/second`` should be close to 1: an eager
call that imports the compiler stack (torch._dynamo, sympy) pays one to two seconds once.

The ``generate`` rows time ``reformer generate`` of 20 tokens from a saved model of the tiny preset's shape
(a fresh process each, wall-clock of the whole command) against ``python -c "import reformer"``.

Usage: ``python benchmarks/cold_start.py [--repeats 3] [--length 4096]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

CALLS = r"""
import sys, time
t0 = time.perf_counter()
import torch, reformer
imported = time.perf_counter() - t0
mode, length = sys.argv[1], int(sys.argv[2])
cfg = reformer.ReformerConfig(vocab_size=256, d_model=256, n_heads=4, n_layers=6, d_ff=1024, bucket_size=64,
                              n_hashes=2, max_seq_len=length)
torch.manual_seed(0)
model = reformer.ReformerLM(cfg).train(mode == "train")
ids = torch.randint(0, 256, (1, length))
times = []
for _ in range(3):
    start = time.perf_counter()
    if mode == "train":
        model(ids, targets=ids.roll(-1, 1)).backward()
    else:
        with torch.no_grad():
            model(ids)
    times.append(time.perf_counter() - start)
print(imported, *times)
"""

SAVE_TINY = r"""
import sys, torch, reformer
from reformer.tasks import presets
torch.manual_seed(0)
reformer.ReformerLM(reformer.ReformerConfig(vocab_size=256, max_seq_len=512, **presets()["tiny"].model)
                    ).save_pretrained(sys.argv[1])
"""


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row (median)")
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()
    for mode in ("eval", "train"):
        rows = [
            [float(x) for x in subprocess.run(
                [sys.executable, "-c", CALLS, mode, str(args.length)], check=True, capture_output=True,
                text=True).stdout.split()]
            for _ in range(args.repeats)
        ]  # fmt: skip
        first, second = (statistics.median(r[i] for r in rows) for i in (1, 2))
        ratios = ", ".join(f"{r[1] / r[2]:.2f}" for r in rows)
        print(
            f"{mode:5s} L={args.length}: first call {first:.3f} s, second {second:.3f} s, "
            f"first/second {first / second:.2f} (per process: {ratios})",
            flush=True,
        )
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-c", SAVE_TINY, folder], check=True)
        generate = [sys.executable, "-m", "reformer", "generate", folder, "--prompt", "def f(x):",
                    "--max-new-tokens", "20", "--seed", "0"]  # fmt: skip
        imports, totals = [], []
        for _ in range(args.repeats):
            imports.append(wall([sys.executable, "-c", "import reformer"]))
            totals.append(wall(generate))
        imp, total = statistics.median(imports), statistics.median(totals)
        print(
            f"generate 20 tokens: {total:.3f} s, import alone {imp:.3f} s, difference {total - imp:.3f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
