"""Running averages kept on the device: the step loop adds tensors, only `means()` waits for the device."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Later(NamedTuple):
    """A step's total computed later, for many steps at once: `per_sample(*inputs)`, on each input concatenated
    over the steps along dim 0, gives one value per sample, and a step's total is the sum over its own samples.

    For statistics that are a few small ops per step (a classifier's correct-prediction count is argmax, compare
    and count): on a CPU each op's dispatch costs more than its arithmetic (~50 us of a 3-5 ms MLP step), so
    `StepSums` runs them once per logging interval instead. The inputs must be detached (they are held until then).
    """
    per_sample: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]


class Averages:
    """Sample-weighted averages of named values. `add` takes sums over `n` samples, e.g. a batch's summed loss.

    The state is a dict of tensors and one int, so it can live inside a checkpoint (mid-epoch resume).
    """

    def __init__(self, state: dict[str, torch.Tensor | int] | None = None) -> None:
        self.sums: dict[str, torch.Tensor | int] = dict(state or {})

    def add(self, n: int, sums: dict[str, torch.Tensor | Later],
            means: dict[str, torch.Tensor] | None = None) -> None:
        """Add a batch of `n` samples: `sums` are totals over the batch (e.g. correct predictions), `means` are
        per-sample means (e.g. a mean loss), weighted by `n`. One in-place op per value, on the device."""
        for name, value in sums.items():
            value = _later_totals([value])[0] if type(value) is Later else value.detach()  # a `Later`: its total now
            self._total(name, value).add_(value)
        for name, value in (means or {}).items():
            self._total(name, value).add_(value.detach(), alpha=n)
        self.sums["_n"] = int(self.sums.get("_n", 0)) + n

    def _total(self, name: str, like: torch.Tensor) -> torch.Tensor:
        total = self.sums.get(name)
        if total is None:  # float32 everywhere (MPS has no float64); counts stay exact up to 2**24 per epoch
            total = self.sums[name] = torch.zeros((), dtype=torch.float32, device=like.device)
        return total

    def means(self, prefix: str = "") -> dict[str, float]:
        n = max(1, int(self.sums.get("_n", 0)))
        return {f"{prefix}{k}": float(v) / n for k, v in self.sums.items() if k != "_n"}

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return self.sums


class StepSums:
    """The training epoch's sums: one value per step and statistic, read only when someone asks.

    `add` appends the step's tensors to a list: no device op and no host sync in the step loop (an in-place add per
    statistic cost as much as the statistic itself on a small CPU model). `totals()` (logging steps, the epoch's end)
    and `state_dict()` (checkpoints) first stack the waiting values into one buffer per statistic, weighted by the
    step's sample count where they are means. A total is always the sum of that buffer: the same values in the same
    order wherever the reads fell, so a run resumed mid-epoch (its checkpoint holds the buffers) reports bitwise the
    same training metrics as one that never stopped.
    """

    HELD_ELEMENTS = 1 << 22  # `Later` inputs held before they are reduced early (16 MiB of float32)

    def __init__(self, state: dict[str, torch.Tensor | int] | None = None) -> None:
        self._waiting: list[tuple[int, dict[str, torch.Tensor | Later], dict[str, torch.Tensor] | None]] = []
        self._held = 0  # elements of the waiting `Later` inputs
        self._buffers: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (storage with room to grow, values used)
        self._n = 0
        for name, value in (state or {}).items():
            if name == "_n":
                self._n = int(value)
            else:  # per-step values; a total (a 0-d tensor, from Averages' state) counts as one step
                self._append(name, value.detach().float().reshape(-1))

    def add(self, n: int, sums: dict[str, torch.Tensor | Later],
            means: dict[str, torch.Tensor] | None = None) -> None:
        """A step of `n` samples: `sums` are totals over its batch (e.g. correct predictions; a `Later` computes
        its total when read), `means` per-sample means (e.g. a mean loss), weighted by `n` when read."""
        self._waiting.append((n, sums, means))
        self._n += n
        for value in sums.values():
            if type(value) is Later:
                self._held += sum(t.numel() for t in value.inputs)
        if self._held > self.HELD_ELEMENTS:  # bounded memory for long logging intervals or many classes
            self._stack()

    def totals(self) -> Averages:
        """The sums so far (and the sample count), as Averages: `means()` reads them to the host."""
        self._stack()
        return Averages({**{name: buf[:used].sum() for name, (buf, used) in self._buffers.items()}, "_n": self._n})

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Every statistic's per-step values (copies of exactly the used part), and the sample count."""
        self._stack()
        return {**{name: buf[:used].clone() for name, (buf, used) in self._buffers.items()}, "_n": self._n}

    @torch.no_grad()
    def _stack(self) -> None:
        waiting, self._waiting, self._held = self._waiting, [], 0
        if not waiting:
            return
        names = dict.fromkeys(name for _, sums, means in waiting for name in (*sums, *(means or ())))
        for name in names:
            values, weights = [], []
            for n, sums, means in waiting:
                if name in sums:
                    values.append(sums[name])
                    weights.append(1)
                elif means is not None and name in means:
                    values.append(means[name])
                    weights.append(n)
            # float32 everywhere (MPS has no float64); counts stay exact up to 2**24 per epoch
            stacked = (_later_totals(values) if type(values[0]) is Later
                       else torch.stack(values).float())  # no_grad: no graph even from a loss that still has one
            if len(set(weights)) == 1:
                stacked = stacked if weights[0] == 1 else stacked * weights[0]
            else:  # the same float32 products as multiplying by each weight alone
                stacked = stacked * torch.tensor(weights, dtype=torch.float32).to(stacked.device, non_blocking=True)
            self._append(name, stacked)

    def _append(self, name: str, values: torch.Tensor) -> None:
        """Append to the buffer, doubling its storage when full: appending is O(new values), not O(epoch)."""
        buf, used = self._buffers.get(name, (None, 0))
        if buf is not None and buf.device != values.device:  # a checkpoint's values (loaded on the CPU) meet the run's
            buf = buf.to(values.device)
        if buf is None or used + len(values) > len(buf):
            grown = values.new_empty(max(64, used + len(values), 2 * (0 if buf is None else len(buf))))
            if used:
                grown[:used] = buf[:used]
            buf = grown
        buf[used:used + len(values)] = values
        self._buffers[name] = (buf, used + len(values))


def _later_totals(values: list[Later]) -> torch.Tensor:
    """Each step's total of its `Later` statistic [steps], from one pass over all the steps' samples."""
    counts = [v.inputs[0].shape[0] for v in values]
    per_sample = values[0].per_sample(*(torch.cat(parts) for parts in zip(*(v.inputs for v in values)))).float()
    if len(set(counts)) == 1:  # equal batches: one reduction
        return per_sample.view(len(values), counts[0]).sum(1)  # [steps * B] -> [steps]
    return torch.stack([part.sum() for part in per_sample.split(counts)])
