"""This process's place in a ``torchrun`` job: device, collectives, and the replica check."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist

from ..devices import default_device
from ..tasks import TrainingError


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str | None = None) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if device is None:
            device = str(default_device())
        if world_size == 1:
            return cls(device=torch.device(device))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(device)
        if dev.type == "cuda":
            if dev.index is not None:  # every rank on one GPU: NCCL refuses, or all share its memory
                raise TrainingError(
                    f"--device {device} names one GPU for all {world_size} processes; use --device cuda "
                    "(each process takes the GPU of its LOCAL_RANK)"
                )
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return cls(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(), device=dev)

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) of ``values`` over processes; one small collective."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
        return tensor.tolist()

    def mesh(self, sequence_parallel: int = 1) -> Mesh:
        """The 2-D layout (data-parallel replicas x sequence-parallel ranks) of this job's processes."""
        if sequence_parallel < 1 or self.world_size % sequence_parallel:
            raise TrainingError(
                f"--sequence-parallel {sequence_parallel} must divide the {self.world_size} process(es)"
            )
        if self.world_size == 1:
            return Mesh(replicas=1, replica=0, data_group=None, sequence_group=None)
        from torch.distributed.device_mesh import init_device_mesh

        shape = (self.world_size // sequence_parallel, sequence_parallel)
        device_mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=("data", "sequence"))
        return Mesh(
            replicas=shape[0],
            replica=device_mesh.get_local_rank("data"),
            data_group=device_mesh.get_group("data"),
            sequence_group=device_mesh.get_group("sequence"),
        )

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def shutdown(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


PEER_FAILURE_WORDS = ("gloo", "nccl", "connection", "broken pipe", "timed out")


@contextlib.contextmanager
def peer_failures(dist: Distributed, run: str | os.PathLike) -> Iterator[None]:
    """Turn the error of a collective whose peer died (killed, crashed, out of memory) into a
    :class:`TrainingError` saying so and how to continue, instead of the backend's traceback."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        peer_lost = isinstance(err, getattr(torch_dist, "DistError", ())) or any(
            word in text.lower() for word in PEER_FAILURE_WORDS
        )
        if dist.world_size == 1 or isinstance(err, TrainingError) or not peer_lost:
            raise
        detail = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0]).split(". This is")[0]
        raise TrainingError(
            f"rank {dist.rank} of {dist.world_size}: another process of the job stopped ({detail}); the "
            f"checkpoints in {run} are intact: restart the job with --resume"
        ) from err


@dataclass
class Mesh:
    """This process's place on the (data, sequence) mesh: its replica index among ``replicas``, and the
    process groups of its data-parallel and sequence-parallel dimensions (None in a single process)."""

    replicas: int
    replica: int
    data_group: object
    sequence_group: object


def check_replicas(model: torch.nn.Module, dist: Distributed) -> None:
    """Fail loudly if DDP replicas drifted apart: they must stay bit-identical."""
    import hashlib

    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests: list[str | None] = [None] * dist.world_size
    torch_dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise TrainingError("parameters differ across processes after training; this is a bug")
    if dist.is_main:
        print(f"parameters identical across {dist.world_size} processes", file=sys.stderr)
