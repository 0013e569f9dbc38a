"""Checkpoint folders: crash-safe writes, a manifest verified on load, resuming from the newest good
checkpoint, pruning, and the RNG states that make a resumed run continue exactly.

A checkpoint is written into a temporary folder, every file flushed to the disk, then a
``manifest.json`` (each file's size and SHA-256), the folder flushed and renamed to ``step-NNNNNNNN``,
and its parent flushed: after a crash or a power cut at any instant a ``step-*`` folder is complete, and
the temporary folder, if any, is removed by the next run. Resuming verifies the manifest and falls back
to an older checkpoint, naming each one it skipped and why; a damaged checkpoint is moved to
``checkpoints/damaged/``, never deleted. Pruning keeps the newest ``keep`` good checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import read_json_object
from ..files import atomic_write, fsync_dir, fsync_file, make_dirs
from ..tasks import TrainingError
from .metrics import METRICS_FILE

TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"
DAMAGED_DIR = "damaged"
# Files every checkpoint holds (the model's own files come with it, listed in the manifest).
REQUIRED_FILES = ("model.safetensors", "config.json", "optimizer.pt", "rng.pt", TRAINER_STATE_FILE)
MODEL_FILES = ("model.safetensors", "config.json", "head.json")
# Test hook: seconds to sleep at each stage of a checkpoint write, so that a kill can land inside it.
PAUSE_ENV = "REFORMER_TEST_CHECKPOINT_PAUSE"
_TEMP_MARK, _DELETING_MARK = ".tmp-", ".deleting-"


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (a full disk, a write error); the previous ones are intact."""


def _step_of(folder: Path) -> int | None:
    name = folder.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete (renamed) checkpoint folders of a run, oldest first; not yet verified."""
    root = Path(run) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


# ---- manifest ------------------------------------------------------------------------------------


def file_digest(path: Path, block: int = 1 << 20) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a file, read in blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Write ``manifest.json``: the size and SHA-256 of every other file in ``folder``, read back from
    the disk (so that it describes what was written, not what was meant to be)."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_FILE:
            size, sha256 = file_digest(path)
            files[path.name] = {"bytes": size, "sha256": sha256}
    text = json.dumps({"format": 1, "files": files}, indent=2) + "\n"
    atomic_write(folder / MANIFEST_FILE, lambda tmp: tmp.write_text(text))


def checkpoint_problem(folder: Path, checksums: bool = True) -> str | None:
    """Why ``folder`` is not a usable checkpoint, or None when it is: its manifest must list every
    required file, and each listed file must have the listed size (and, with ``checksums``, SHA-256).
    A folder without a manifest (written before manifests existed) is accepted when the required files
    are there and not empty."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        for name in REQUIRED_FILES:
            path = folder / name
            if not path.is_file() or path.stat().st_size == 0:
                return f"no {MANIFEST_FILE}, and {name} is missing or empty"
        return None
    try:
        listed = json.loads(manifest.read_text())["files"]
        expected = {name: (int(v["bytes"]), str(v["sha256"])) for name, v in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({type(err).__name__}: {err})"
    for name in REQUIRED_FILES:
        if name not in expected:
            return f"{MANIFEST_FILE} does not list {name}"
    for name, (size, sha256) in expected.items():
        path = folder / name
        try:
            if not checksums:
                found = path.stat().st_size
                if found != size:
                    return f"{name} has {found} bytes, the manifest says {size}"
                continue
            found, digest = file_digest(path)
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
        if found != size:
            return f"{name} has {found} bytes, the manifest says {size}"
        if digest != sha256:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


# ---- writing ---------------------------------------------------------------------------------------


def _pause(stage: str) -> None:
    seconds = float(os.environ.get(PAUSE_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)


class _Writes:
    """A file's ``write`` that keeps the ``OSError`` it raised: ``torch.save`` reports a failed write
    as a RuntimeError that does not say why ("unexpected pos")."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        writes = _Writes(f)
        try:
            torch.save(obj, writes)
        except RuntimeError as err:
            if writes.error is not None:
                raise writes.error from err
            raise
        f.flush()
        os.fsync(f.fileno())


def remove_leftovers(run: Path, announce: bool = False) -> None:
    """Remove the temporary folders of checkpoint writes and deletions that were interrupted: an
    unfinished checkpoint is never one a run resumes from. The caller holds the run folder's lock (no
    other process writes there; process ids are not compared, as a restarted container reuses them).
    With ``announce`` (a resumed run) also the temporary files of the run folder's own atomic writes."""
    root = Path(run) / CHECKPOINTS_DIR
    if announce and Path(run).is_dir():
        for path in Path(run).iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file():
                path.unlink()
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(".step-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            if announce and _TEMP_MARK in path.name:
                print(f"removed {path.name}, a checkpoint write that was interrupted", file=sys.stderr)
    fsync_dir(root)


def set_aside(folder: Path, problem: str, announce: bool = True) -> Path:
    """Move a damaged checkpoint into ``checkpoints/damaged/`` (kept for inspection, never used again)."""
    shelf = folder.parent / DAMAGED_DIR
    make_dirs(shelf)
    target, n = shelf / folder.name, 1
    while target.exists():
        n += 1
        target = shelf / f"{folder.name}-{n}"
    os.replace(folder, target)
    fsync_dir(folder.parent)
    fsync_dir(shelf)
    if announce:
        print(f"checkpoint {folder.name} is damaged ({problem}); moved it to {target}", file=sys.stderr)
    return target


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder: renamed away first, so that a crash midway leaves no half checkpoint."""
    doomed = folder.parent / f".{folder.name}{_DELETING_MARK}{os.getpid()}"
    os.replace(folder, doomed)
    fsync_dir(folder.parent)
    shutil.rmtree(doomed)


def prune_checkpoints(run: Path, keep: int, newest: Path | None = None) -> None:
    """Keep the newest ``keep`` good checkpoints and delete older good ones. A checkpoint whose files do
    not have their manifest sizes is set aside, not counted: pruning never deletes the last good one.
    ``newest``: the checkpoint just written (trusted without a check)."""
    good = 0
    for folder in reversed(checkpoint_dirs(run)):
        problem = None if folder == newest else checkpoint_problem(folder, checksums=False)
        if problem is not None:
            set_aside(folder, problem)
        elif good < keep:
            good += 1
        else:
            _remove(folder)
            _pause("prune")


def _write_error(err: BaseException, final: Path, run: Path, previous: Path | None) -> CheckpointWriteError:
    try:
        free = f"; {shutil.disk_usage(final.parent).free / 2**20:,.1f} MiB free there"
    except OSError:
        free = ""
    reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
    kept = (
        f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    )
    return CheckpointWriteError(
        f"could not write checkpoint {final} ({reason}{free}); the partial copy was removed and {kept}. "
        f"Free disk space (or fix the folder), then continue with: reformer train --out {run} --resume"
    )


def save_checkpoint(
    run: Path, state: dict[str, Any], model: torch.nn.Module, optimizer, rng: dict, keep: int
):
    """Write ``checkpoints/step-N`` crash-safely (temporary folder, fsync, manifest, rename, fsync),
    refresh the run folder's model files, and keep the newest ``keep`` good checkpoints. Returns the
    checkpoint folder. A write error raises :class:`CheckpointWriteError` with the older checkpoints
    and the run folder's files as they were."""
    run = Path(run)
    root = run / CHECKPOINTS_DIR
    final = root / f"step-{state['step']:08d}"
    if final.is_dir():
        problem = checkpoint_problem(final)
        if problem is None:
            return final
        set_aside(final, problem)
    previous = next((p for p in reversed(checkpoint_dirs(run)) if _step_of(p) < state["step"]), None)
    if (run / METRICS_FILE).is_file():
        fsync_file(run / METRICS_FILE)  # the lines logged so far outlive a power cut with the checkpoint
    tmp = root / f".{final.name}{_TEMP_MARK}{os.getpid()}"
    try:
        make_dirs(root)
        remove_leftovers(run)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save_pretrained(tmp)  # each file flushed (atomic_write)
        _pause("model")
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _pause("optimizer")
        _torch_save(rng, tmp / "rng.pt")
        atomic_write(tmp / TRAINER_STATE_FILE, lambda p: p.write_text(json.dumps(state, indent=2) + "\n"))
        _pause("state")
        write_manifest(tmp)
        fsync_dir(tmp)
        _pause("manifest")
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError":
            raise _write_error(err, final, run, previous) from err
        raise
    _pause("renamed")
    try:
        model.save_pretrained(run)  # the newest weights, loadable as a model folder
    except (OSError, RuntimeError) as err:
        raise CheckpointWriteError(
            f"saved checkpoint {final}, but could not refresh the model files of {run} ({err}); free disk "
            f"space, then continue with: reformer train --out {run} --resume"
        ) from err
    _pause("refreshed")
    prune_checkpoints(run, keep, newest=final)
    return final


# ---- resuming --------------------------------------------------------------------------------------


def resume_checkpoint(run: Path, is_main: bool = True) -> Path | None:
    """The checkpoint a resumed run starts from: the newest complete one whose manifest verifies
    (sizes and SHA-256). Newer damaged ones are named with the reason and, on the main process, moved to
    ``checkpoints/damaged/``; leftovers of interrupted writes are removed; the run folder's model files
    become the chosen checkpoint's. None when the run saved no checkpoint yet. Raises
    :class:`TrainingError` when checkpoints exist but none verifies (nothing is moved then)."""
    run = Path(run)
    if is_main:
        remove_leftovers(run, announce=True)
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(checkpoint_dirs(run)):
        problem = checkpoint_problem(folder)
        if problem is None:
            break
        skipped.append((folder, problem))
    else:
        if skipped:
            reasons = "; ".join(f"{f.name}: {p}" for f, p in skipped)
            raise TrainingError(
                f"--resume: no checkpoint of {run} passes verification ({reasons}). The run cannot continue "
                "exactly; move the run folder aside and start a new run"
            )
        return None
    if is_main:
        if not (folder / MANIFEST_FILE).is_file():
            print(
                f"{folder.name} has no {MANIFEST_FILE} (an older version wrote it): not verified",
                file=sys.stderr,
            )
        for damaged, problem in skipped:
            set_aside(damaged, f"{problem}; skipped, resuming from {folder.name}")
        for name in MODEL_FILES:
            source = folder / name
            try:
                if source.is_file():
                    atomic_write(run / name, lambda tmp, s=source: shutil.copyfile(s, tmp))
            except OSError as err:
                raise TrainingError(f"could not copy {source} into {run} ({err.strerror or err})") from err
            if name == "head.json" and not source.is_file():
                (run / name).unlink(missing_ok=True)
    return folder


def load_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer, device: torch.device
) -> tuple[dict, dict]:
    """Restore weights and optimiser state from ``folder``; returns (trainer state, RNG states)."""
    fix = "move it out of checkpoints/ to resume from the one before"
    state = read_json_object(folder / TRAINER_STATE_FILE, f"the checkpoint is damaged; {fix}")
    loaded = type(model).from_pretrained(folder, map_location=device, **model.head_settings())
    if loaded.config.to_dict() != model.config.to_dict():
        raise TrainingError(f"{folder}/config.json does not match the run's model settings")
    model.load_state_dict(loaded.state_dict())
    try:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
        rng = torch.load(folder / "rng.pt", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise TrainingError(f"{folder} is damaged ({err}); {fix}") from err
    return state, rng


def rng_states(data: torch.Generator) -> dict[str, Any]:
    """The global CPU (and CUDA) generator states and that of the training batches, ``data``."""
    states = {"torch": torch.get_rng_state(), "data": data.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any], data: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    data.set_state(states["data"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
