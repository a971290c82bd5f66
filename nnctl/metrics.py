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
    statistic cost as much as the statistic itself on a small CPU model). `totals()` (the epoch's end) and
    `state_dict()` (checkpoints) first stack the waiting values into one buffer per statistic, weighted by the
    step's sample count where they are means; `totals(means_only=True)` (logging steps, which show the losses)
    stacks the means only and leaves the statistics, a `Later` above all, waiting: computed once over many steps.
    A total is always the sum of that buffer: the same values in the same order wherever the reads fell, so a run
    resumed mid-epoch (its checkpoint holds the buffers) reports bitwise the same training metrics as one that
    never stopped. A name is either a total or a mean, never both.
    """

    HELD_ELEMENTS = 1 << 22  # `Later` inputs held before they are reduced early (16 MiB of float32)

    def __init__(self, state: dict[str, torch.Tensor | int] | None = None) -> None:
        self._sums: list[dict[str, torch.Tensor | Later]] = []  # waiting totals, one dict per step
        self._means: list[tuple[int, dict[str, torch.Tensor]]] = []  # waiting means with their step's sample count
        self._room = 1  # waiting steps at which the elements held by their `Later` inputs are next measured
        self._mean_names: set[str] = set()  # names stacked as means (what `totals(means_only=True)` returns)
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
        self._n += n
        if means:
            self._means.append((n, means))
        if sums:
            self._sums.append(sums)
            if len(self._sums) >= self._room:  # bounded memory for long epochs or many classes
                self._make_room()

    def _make_room(self) -> None:
        """Reduce the waiting `Later` inputs once they hold more than HELD_ELEMENTS, and set how many waiting steps
        to look again at (counted on every step, measured only here): as many more as fit at their size so far."""
        held = sum(t.numel() for step in self._sums for value in step.values() if type(value) is Later
                   for t in value.inputs)
        per_step = max(1, held // len(self._sums))
        if held > self.HELD_ELEMENTS:
            self._stack()
            held = 0
        self._room = len(self._sums) + max(1, (self.HELD_ELEMENTS - held) // per_step)

    def totals(self, means_only: bool = False) -> Averages:
        """The sums so far (and the sample count), as Averages: `means()` reads them to the host. `means_only`:
        the means' sums only (the losses, for the step log)."""
        self._stack(means_only)
        return Averages({**{name: buf[:used].sum() for name, (buf, used) in self._ordered(means_only)},
                         "_n": self._n})

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Every statistic's per-step values (copies of exactly the used part), and the sample count."""
        self._stack()
        return {**{name: buf[:used].clone() for name, (buf, used) in self._ordered()}, "_n": self._n}

    def _ordered(self, means_only: bool = False) -> list[tuple[str, tuple[torch.Tensor, int]]]:
        """The buffers, totals before means (each in first-seen order), whatever order the reads made them in."""
        totals = [] if means_only else [item for item in self._buffers.items() if item[0] not in self._mean_names]
        return totals + [item for item in self._buffers.items() if item[0] in self._mean_names]

    @torch.no_grad()
    def _stack(self, means_only: bool = False) -> None:
        means, self._means = self._means, []
        for name in dict.fromkeys(name for _, step in means for name in step):
            present = [(n, step[name]) for n, step in means if name in step]
            weights = [n for n, _ in present]
            # no_grad: no graph even from a loss that still has one; float32 everywhere (MPS has no float64)
            stacked = torch.stack([value for _, value in present]).float()
            if len(set(weights)) == 1:
                stacked = stacked * weights[0] if weights[0] != 1 else stacked
            else:  # the same float32 products as multiplying by each weight alone
                stacked = stacked * torch.tensor(weights, dtype=torch.float32).to(stacked.device, non_blocking=True)
            self._mean_names.add(name)
            self._append(name, stacked)
        if means_only:
            return
        sums, self._sums = self._sums, []
        for name in dict.fromkeys(name for step in sums for name in step):
            if name in self._mean_names:
                raise ValueError(f"training statistic {name!r} is both a total and a mean: name them apart")
            values = [step[name] for step in sums if name in step]
            # counts stay exact in float32 up to 2**24 per epoch
            self._append(name, _later_totals(values) if type(values[0]) is Later else torch.stack(values).float())

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
