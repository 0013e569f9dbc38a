"""Checkpoints under faults: manifests, resuming from the newest good checkpoint, pruning, write errors
(an injected OSError, and a real one: RLIMIT_FSIZE in a subprocess), leftovers of interrupted writes.

Oracle: a straight run of the same settings; a resumed run must end bit-identical to it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from reformer.cli import main
from reformer.train import TrainingError, checkpoint_dirs, train
from reformer.train import checkpoints as ckpt
from tests.conftest import SMALL_FLAGS, SMALL_MODEL
from tests.conftest import small_lm_config as small_config

pytestmark = pytest.mark.usefixtures("own_cache")


def _weights(run):
    return {name: value.clone() for name, value in load_file(run / "model.safetensors").items()}


def _assert_same_weights(a, b):
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_and_catches_each_kind_of_damage(tmp_path, corpus_file):
    run = tmp_path / "run"
    train(small_config(corpus_file, steps=5, save_every=5), run)
    (folder,) = checkpoint_dirs(run)
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert sorted(manifest) == on_disk and set(ckpt.REQUIRED_FILES) <= set(on_disk)
    for name, entry in manifest.items():  # an independent hash of each file
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.checkpoint_problem(folder) is None
    original = {p.name: p.read_bytes() for p in folder.iterdir()}

    def damaged(change):
        change()
        try:
            return ckpt.checkpoint_problem(folder), ckpt.checkpoint_problem(folder, checksums=False)
        finally:
            for name, data in original.items():
                (folder / name).write_bytes(data)

    full, quick = damaged(lambda: _flip_a_byte(folder / "optimizer.pt"))
    assert full == "optimizer.pt does not match its SHA-256 in the manifest" and quick is None
    full, quick = damaged(lambda: (folder / "rng.pt").write_bytes(original["rng.pt"][:-1]))
    assert (
        full
        == quick
        == f"rng.pt has {len(original['rng.pt']) - 1} bytes, the manifest says {len(original['rng.pt'])}"
    )
    full, _ = damaged(lambda: (folder / "trainer_state.json").unlink())
    assert full.startswith("trainer_state.json cannot be read")
    full, _ = damaged(lambda: (folder / "manifest.json").write_text("{"))
    assert full.startswith("manifest.json is unreadable")
    listed = json.loads(original["manifest.json"])
    del listed["files"]["rng.pt"]
    full, _ = damaged(lambda: (folder / "manifest.json").write_text(json.dumps(listed)))
    assert full == "manifest.json does not list rng.pt"
    full, _ = damaged(lambda: ((folder / "manifest.json").unlink(), (folder / "rng.pt").write_bytes(b"")))
    assert full == "no manifest.json, and rng.pt is missing or empty"
    assert ckpt.checkpoint_problem(folder) is None


def test_resume_falls_back_past_a_damaged_checkpoint_and_sets_it_aside(tmp_path, corpus_file, capsys):
    cfg = dict(model={**SMALL_MODEL, "dropout": 0.1}, save_every=5)
    train(small_config(corpus_file, steps=15, **cfg), tmp_path / "straight")
    run = tmp_path / "run"
    train(small_config(corpus_file, steps=10, **cfg), run)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000005", "step-00000010"]
    newest = checkpoint_dirs(run)[-1]
    _flip_a_byte(newest / "optimizer.pt")  # same size: only the checksum sees it
    capsys.readouterr()
    train(small_config(corpus_file, steps=15, **cfg), run, resume=True)
    err = capsys.readouterr().err
    assert "checkpoint step-00000010 is damaged (optimizer.pt does not match its SHA-256" in err
    assert "skipped, resuming from step-00000005" in err and "resumed" in err and "at step 5" in err
    shelved = run / "checkpoints" / "damaged" / "step-00000010"
    assert shelved.is_dir() and ckpt.checkpoint_problem(shelved) is not None  # kept, not deleted
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000010", "step-00000015"]
    _assert_same_weights(run, tmp_path / "straight")


def test_resume_refreshes_the_run_folders_weights_from_its_checkpoint(tmp_path, corpus_file):
    """A kill between a checkpoint's rename and the refresh of the run folder's weights leaves them a
    checkpoint behind; resuming (even at the last step, where nothing is saved again) repairs that."""
    run = tmp_path / "run"
    train(small_config(corpus_file, steps=10, save_every=5), run)
    final = _weights(run)
    (run / "model.safetensors").write_bytes((checkpoint_dirs(run)[0] / "model.safetensors").read_bytes())
    train(small_config(corpus_file, steps=10, save_every=5), run, resume=True)
    assert all(torch.equal(final[k], v) for k, v in _weights(run).items())


def test_pruning_keeps_the_only_good_checkpoint(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    train(small_config(corpus_file, steps=10, save_every=5, keep_checkpoints=3), run)
    older, newest = checkpoint_dirs(run)
    (newest / "optimizer.pt").write_bytes(b"")  # a file cut short: sizes disagree
    ckpt.prune_checkpoints(run, keep=1)
    assert checkpoint_dirs(run) == [older]
    assert "checkpoint step-00000010 is damaged (optimizer.pt has 0 bytes" in capsys.readouterr().err
    assert (run / "checkpoints" / "damaged" / "step-00000010" / "model.safetensors").is_file()


def test_a_damaged_folder_at_the_step_being_saved_is_set_aside_and_rewritten(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    train(small_config(corpus_file, steps=10, save_every=5), run)
    (checkpoint_dirs(run)[-1] / "rng.pt").write_bytes(b"x")
    capsys.readouterr()
    train(small_config(corpus_file, steps=10, save_every=5), run, resume=True)
    assert "step-00000010 is damaged" in capsys.readouterr().err
    train(small_config(corpus_file, steps=10, save_every=5), tmp_path / "straight")
    assert ckpt.checkpoint_problem(checkpoint_dirs(run)[-1]) is None
    _assert_same_weights(run, tmp_path / "straight")


def test_no_checkpoint_verifies_is_an_error_that_moves_nothing(tmp_path, corpus_file):
    run = tmp_path / "run"
    train(small_config(corpus_file, steps=10, save_every=5), run)
    for folder in checkpoint_dirs(run):
        _flip_a_byte(folder / "model.safetensors")
    with pytest.raises(
        TrainingError, match=r"no checkpoint of .* passes verification \(step-00000010: .*step-00000005"
    ):
        train(small_config(corpus_file, steps=15, save_every=5), run, resume=True)
    assert len(checkpoint_dirs(run)) == 2 and not (run / "checkpoints" / "damaged").exists()


def test_resume_before_the_first_checkpoint_starts_over_exactly(tmp_path, corpus_file, capsys):
    """A run killed before its first checkpoint holds only its settings: --resume starts it again."""
    run = tmp_path / "run"
    train(small_config(corpus_file, steps=4, save_every=4), run)
    for folder in checkpoint_dirs(run):
        ckpt._remove(folder)
    stale = run / "checkpoints" / ".step-00000004.tmp-999999999"  # a write interrupted by a kill
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"partial")
    capsys.readouterr()
    train(small_config(corpus_file, steps=4, save_every=4), run, resume=True)
    err = capsys.readouterr().err
    assert "removed .step-00000004.tmp-999999999, a checkpoint write that was interrupted" in err
    assert "at step 0 from its start" in err and not stale.exists()
    train(small_config(corpus_file, steps=4, save_every=4), tmp_path / "straight")
    _assert_same_weights(run, tmp_path / "straight")


def test_an_injected_write_error_keeps_the_previous_checkpoint_and_the_run_resumable(
    tmp_path, corpus_file, monkeypatch
):
    cfg = dict(save_every=5)
    train(small_config(corpus_file, steps=10, **cfg), tmp_path / "straight")
    run = tmp_path / "run"
    train(small_config(corpus_file, steps=5, **cfg), run)
    before = _weights(run)

    def full_disk(obj, f):
        f.write(b"some bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError) as caught:
        train(small_config(corpus_file, steps=10, **cfg), run, resume=True)
    message = str(caught.value)
    assert "could not write checkpoint" in message and "step-00000010 (No space left on device;" in message
    assert "the previous checkpoint step-00000005 is intact" in message and "--resume" in message
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000005"]  # no temporary folder
    assert ckpt.checkpoint_problem(checkpoint_dirs(run)[0]) is None
    assert all(torch.equal(before[k], v) for k, v in _weights(run).items())
    monkeypatch.undo()
    train(small_config(corpus_file, steps=10, **cfg), run, resume=True)
    _assert_same_weights(run, tmp_path / "straight")


def _limited_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_real_write_error_under_rlimit_fsize_reports_and_resumes(tmp_path, corpus_file):
    """The kernel refuses writes past RLIMIT_FSIZE bytes (EFBIG, as a full disk refuses with ENOSPC):
    the optimiser state (~350 kB) cannot be written, the weights (~170 kB) can."""
    env = {**os.environ, "REFORMER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    command = [sys.executable, "-m", "reformer", "train", "--data", str(corpus_file), *SMALL_FLAGS,
               "--save-every", "3", "--eval-every", "3", "--eval-batches", "1"]  # fmt: skip
    run, straight = tmp_path / "run", tmp_path / "straight"
    for args in (["--out", str(straight), "--steps", "6"], ["--out", str(run), "--steps", "3"]):
        done = subprocess.run([*command, *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    resumed = [*command, "--out", str(run), "--resume", "--steps", "6"]
    done = subprocess.run(
        resumed, env=env, capture_output=True, text=True, preexec_fn=_limited_file_size(250_000)
    )
    assert done.returncode == 1, done.stderr
    assert "could not write checkpoint" in done.stderr and "File too large" in done.stderr
    assert "the previous checkpoint step-00000003 is intact" in done.stderr
    assert "Traceback" not in done.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]
    assert ckpt.checkpoint_problem(run / "checkpoints" / "step-00000003") is None
    done = subprocess.run(resumed, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _assert_same_weights(run, straight)


def test_cli_reports_a_write_error_without_a_traceback(tmp_path, corpus_file, monkeypatch, capsys):
    def failing(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ckpt, "_torch_save", failing)
    run = tmp_path / "run"
    argv = ["train", "--data", str(corpus_file), "--out", str(run), "--steps", "2", *SMALL_FLAGS]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: could not write checkpoint" in err and "Input/output error" in err
    assert "no earlier checkpoint exists" in err
    assert not list((run / "checkpoints").iterdir())


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd")
def test_every_file_and_folder_is_flushed_before_and_after_the_rename(tmp_path, corpus_file, monkeypatch):
    """Replay the fsync and rename calls of a checkpoint save: when the temporary folder is renamed to
    ``step-N``, every file in it and the folder itself were flushed, and the parent is flushed after."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    train(small_config(corpus_file, steps=2, save_every=2), run)
    monkeypatch.undo()
    (final,) = checkpoint_dirs(run)
    flushed: set[str] = set()
    for i, event in enumerate(events):
        if event[0] == "fsync":
            flushed.add(event[1])
        elif event[2] != str(final):  # a file renamed: its flushed data moves with it
            if event[1] in flushed:
                flushed.add(event[2])
        else:
            tmp = event[1]
            assert tmp in flushed, "the temporary folder's entries were not flushed before its rename"
            for name in os.listdir(final):
                assert f"{tmp}/{name}" in flushed, f"{name} was not flushed before the rename"
            later = [e[1] for e in events[i + 1 :] if e[0] == "fsync"]
            assert later and later[0] == str(final.parent), (
                "the parent folder was not flushed after the rename"
            )
            break
    else:
        pytest.fail("the checkpoint folder was never renamed into place")
