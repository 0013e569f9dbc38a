"""Checkpoint folders: atomic writes (temporary folder + rename), pruning, loading, and the RNG states
that make a resumed run continue exactly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import read_json_object
from ..tasks import TrainingError

TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = run / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(
    run: Path, state: dict[str, Any], model: torch.nn.Module, optimizer, rng: dict, keep: int
):
    """Write ``checkpoints/step-N`` atomically (temporary folder + rename), refresh the run folder's
    model files, and drop all but the newest ``keep`` checkpoints. Returns the checkpoint folder."""
    root = run / CHECKPOINTS_DIR
    final = root / f"step-{state['step']:08d}"
    if final.is_dir():
        return final
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.save_pretrained(run)  # the newest weights, loadable as a model folder
    for old in checkpoint_dirs(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer, device: torch.device
) -> tuple[dict, dict]:
    """Restore weights and optimiser state from ``folder``; returns (trainer state, RNG states)."""
    state = read_json_object(
        folder / TRAINER_STATE_FILE, "the checkpoint is damaged; delete it to resume from the one before"
    )
    settings = model.head_settings() if hasattr(model, "head_settings") else {}
    loaded = type(model).from_pretrained(folder, map_location=device, **settings)
    if loaded.config.to_dict() != model.config.to_dict():
        raise TrainingError(f"{folder}/config.json does not match the run's model settings")
    model.load_state_dict(loaded.state_dict())
    try:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
        rng = torch.load(folder / "rng.pt", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise TrainingError(
            f"{folder} is damaged ({err}); delete it to resume from the checkpoint before"
        ) from err
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
