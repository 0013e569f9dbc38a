"""The encoder side of the commands: the ``reformer train`` flags of the encoder tasks, ``reformer eval``
of an encoder run (masked bits per byte; accuracy and macro-F1) and ``reformer predict``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import listops
from ..config import ReformerConfig, read_json_object
from ..data import contiguous_windows, load_corpus
from ..devices import default_device
from ..labelled import DataError, load_labelled
from ..models import ReformerForMaskedLM, ReformerForSequenceClassification
from ..models.heads import POOLINGS
from .config import TRAIN_CONFIG_FILE, TrainConfig, TrainingError
from .encoder_tasks import evaluate_encoder, labelled_batch, listops_eval_min_len, split_padding
from .evaluation import _use_full_attention
from .masking import mask_tokens

TEST_SEED = 2021  # the generated ListOps test set (training and validation use other seeds)
MASK_SEED = 4242  # the masking of `reformer eval` on an MLM run


def add_encoder_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoders (--task mlm | classify | listops)")
    g.add_argument(
        "--valid", nargs=1, metavar="PATH", help="classify: the held-out set (.jsonl or class folders)"
    )
    g.add_argument("--init", metavar="DIR", help="classify: start from this pretrained encoder or MLM run "
                   "(its model settings; the classification head starts fresh)")  # fmt: skip
    g.add_argument("--truncate", action="store_true", default=None,
                   help="cut texts over --seq-len bytes instead of stopping with an error")  # fmt: skip
    g.add_argument("--min-len", type=int, help="listops: shortest expression (default --seq-len / 4)")
    g.add_argument("--eval-min-len", type=int, help="listops: shortest held-out expression, for the run's "
                   "evaluations and reformer eval's test set (default --min-len)")  # fmt: skip
    g.add_argument("--pooling", choices=POOLINGS, help="classify, listops: the head reads the first token "
                   "(default, HF's head) or the mean over the tokens (mean)")  # fmt: skip


def encoder_settings(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """Resolve the encoder flags' paths in ``cfg``; ``--init`` brings its own model settings."""
    if getattr(args, "valid", None):
        cfg.valid = [str(Path(v).resolve()) for v in args.valid]
    if getattr(args, "init", None):
        if cfg.task != "classify":
            raise ValueError(
                "--init starts a classifier from a pretrained encoder; use it with --task classify"
            )
        given = [
            n for n in ("d_model", "n_heads", "n_layers", "d_ff", "attn_layers") if getattr(args, n, None)
        ]
        if given:
            raise ValueError(
                f"--init {args.init} brings its model settings; drop --{given[0].replace('_', '-')}"
            )
        cfg.init = str(Path(args.init).resolve())
        if args.seq_len is None:  # the pretrained encoder's length
            cfg.seq_len = ReformerConfig.from_json(Path(cfg.init) / "config.json").max_seq_len


def run_task(run: str) -> str | None:
    """The task of a run folder (None for a plain model folder or a missing one)."""
    path = Path(run) / TRAIN_CONFIG_FILE
    if not path.is_file():
        return None
    return read_json_object(path, "the run folder is damaged").get("task")


def load_encoder_run(run: str | Path, device: torch.device) -> tuple[TrainConfig, torch.nn.Module]:
    cfg = TrainConfig.from_dict(read_json_object(Path(run) / TRAIN_CONFIG_FILE, "the run folder is damaged"))
    cls = ReformerForMaskedLM if cfg.task == "mlm" else ReformerForSequenceClassification
    return cfg, cls.from_pretrained(run, map_location=device)


def run_encoder_eval(args: argparse.Namespace) -> int:
    """``reformer eval`` of an encoder run: prints ``loss``, then ``bits_per_byte`` (masked bytes of the
    test split) or ``accuracy`` and ``macro_f1`` (``--data`` or the run's held-out set; ListOps: a
    generated test set)."""
    device = default_device(args.device)
    try:
        cfg, model = load_encoder_run(args.run, device)
        if args.full_attention:
            _use_full_attention(model)
        size = args.batch_size or max(1, min(cfg.batch_size, 8))
        if cfg.task == "mlm":
            corpus = load_corpus(args.data if args.data else cfg.data)
            generator = torch.Generator().manual_seed(MASK_SEED)
            windows = contiguous_windows(corpus.test, cfg.seq_len, size, args.max_tokens)
            batches = (mask_tokens(inputs, generator) for inputs, _ in windows)
        elif cfg.task == "listops":
            lo = listops_eval_min_len(cfg) if args.min_len is None else args.min_len
            if not 0 <= lo < cfg.seq_len:
                raise ValueError(f"--min-len {lo} must lie in [0, the run's --seq-len {cfg.seq_len})")
            rows, labels = listops.listops_set(args.n_examples, lo, cfg.seq_len + 1, TEST_SEED)
            batches = (
                (listops.pad_rows(rows[i : i + size]), torch.tensor(labels[i : i + size]))
                for i in range(0, len(rows), size)
            )
        else:
            path = args.data[0] if args.data else cfg.valid[0]
            data = load_labelled(
                path, model.config.max_seq_len, cfg.labels, bool(args.truncate or cfg.truncate)
            )
            batches = (
                labelled_batch(data, range(i, min(i + size, len(data)))) for i in range(0, len(data), size)
            )
        metrics = evaluate_encoder(model, batches, cfg.task, device, args.n_hashes)
    except (DataError, TrainingError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"loss={metrics['loss']:.4f} nats")
    for key in ("bits_per_byte", "accuracy", "macro_f1"):
        if key in metrics:
            print(f"{key}={metrics[key]:.4f}")
    return 0


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a classifier run folder (reformer train --task classify | listops)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to classify (repeatable)")
    source.add_argument("--file", help='texts to classify: a .jsonl file with "text" fields, or one per line')
    p.add_argument("--truncate", action="store_true", help="cut texts over the model's max_seq_len")
    p.add_argument("--top", type=int, default=3, help="classes listed with their probabilities (default 3)")
    p.add_argument("--n-hashes", type=int, help="LSH hash rounds (default: as trained)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def run_predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """One line per text: the predicted label, its probability, then the ``--top`` classes as
    ``label=probability``."""
    device = default_device(args.device)
    try:
        task = run_task(args.run)
        if task not in ("classify", "listops"):
            raise ValueError(
                f"{args.run} is not a classifier run (task {task!r}); train one with --task classify"
            )
        cfg, model = load_encoder_run(args.run, device)
        names = cfg.labels if task == "classify" else [str(d) for d in range(listops.N_CLASSES)]
        texts = (
            [(t, f"--text {i}") for i, t in enumerate(args.text, 1)]
            if args.text
            else _read_texts(Path(args.file))
        )
        rows = [_encode(text, where, task, model.config.max_seq_len, args.truncate) for text, where in texts]
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            ids, mask = split_padding(listops.pad_rows(rows[start : start + 8]).to(device))
            probs = model(ids, attention_mask=mask, n_hashes=args.n_hashes).float().softmax(-1).cpu()
            for p in probs:
                order = p.argsort(descending=True).tolist()
                top = " ".join(f"{names[c]}={p[c]:.4f}" for c in order[: max(1, args.top)])
                print(f"{names[order[0]]}\t{p[order[0]]:.4f}\t{top}")
    return 0


def _read_texts(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"--file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f'{where}: not valid JSON ({err.msg}); write one {{"text": ...}} per line'
                ) from err
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f'{where}: no "text" string; write one {{"text": ...}} object per line')
            line = obj["text"]
        texts.append((line, where))
    if not texts:
        raise DataError(f"{path} holds no texts")
    return texts


def _encode(text: str, where: str, task: str, max_len: int, truncate: bool) -> list[int]:
    if not text.strip():
        raise DataError(f"{where}: the text is empty; give text to classify")
    try:
        ids = listops.from_text(text) if task == "listops" else list(text.encode("utf-8"))
    except ValueError as err:
        raise DataError(f"{where}: {err}") from err
    if len(ids) > max_len:
        if not truncate:
            raise DataError(
                f"{where}: the text is {len(ids)} tokens, over the model's max_seq_len {max_len}; pass "
                "--truncate to keep the first ones"
            )
        ids = ids[:max_len]
    return ids
