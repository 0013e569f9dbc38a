"""When a generated row is finished: an end-of-sequence id or a stop sequence of ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _ids(value, what: str, vocab_size: int) -> list[int]:
    ids = [value] if isinstance(value, int) else list(value)
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
            raise ValueError(f"{what} holds {i!r}; token ids are integers in [0, vocab_size={vocab_size})")
    return ids


class Stopping:
    """Tracks which rows of a batch have finished and pads them afterwards.

    A row finishes after it produces an id of ``eos_token_id`` (an int or a list) or when its generated
    ids end with one of ``stop`` (token-id sequences; the ids of the prompt do not count). The finishing
    ids are kept; every later id of a finished row is ``pad_token_id`` (default: the first
    ``eos_token_id``, else 0).
    """

    def __init__(
        self,
        batch: int,
        vocab_size: int,
        device: torch.device,
        eos_token_id: int | Sequence[int] | None = None,
        stop: Sequence[Sequence[int]] | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        eos = [] if eos_token_id is None else _ids(eos_token_id, "eos_token_id", vocab_size)
        sequences = [_ids(s, "a stop sequence", vocab_size) for s in (stop or [])]
        if any(len(s) == 0 for s in sequences):
            raise ValueError("a stop sequence is empty; give at least one token id")
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        self.pad = _ids(pad_token_id, "pad_token_id", vocab_size)[0]
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.stop = [torch.tensor(s, dtype=torch.long, device=device) for s in sequences]
        self.longest = max((len(s) for s in sequences), default=0)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.recent = torch.zeros(batch, 0, dtype=torch.long, device=device)  # the last `longest` ids

    @property
    def active(self) -> bool:
        """Whether any rule is set (without one, no row ever finishes early)."""
        return self.eos is not None or bool(self.stop)

    def update(self, next_ids: torch.Tensor) -> torch.Tensor:
        """``next_ids`` ``(batch,)`` with finished rows' ids replaced by the pad id; marks the rows that
        finish with this id."""
        next_ids = torch.where(self.finished, torch.full_like(next_ids, self.pad), next_ids)
        done = torch.zeros_like(self.finished)
        if self.eos is not None:
            done |= torch.isin(next_ids, self.eos)
        if self.stop:
            self.recent = torch.cat([self.recent, next_ids[:, None]], dim=1)[:, -self.longest :]
            for sequence in self.stop:
                if self.recent.shape[1] >= len(sequence):
                    done |= (self.recent[:, -len(sequence) :] == sequence).all(1)
        self.finished |= done
        return next_ids

    @property
    def all_finished(self) -> bool:
        return self.active and bool(self.finished.all())
