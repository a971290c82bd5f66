"""The data contract the engine relies on, and the fast in-memory batch path.

A dataset subclass only turns its files into uint8 arrays (`load`). This base class splits them, holds them as
one uint8 tensor on the training device (or streams them through a DataLoader when they do not fit), and yields
augmented, normalized batches. Batch order depends only on (seed, epoch), and each sample's augmentation on (seed,
epoch, its position in the epoch), so a run resumed in the middle of an epoch sees exactly the batches an
uninterrupted run would have seen, and N processes that each take their share of every batch (`shard`) together
see exactly the batches of one process.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from nnctl.data.augment import Normalize, apply_crop_flip, draw_crop_flip
from nnctl.errors import UserError

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Arrays:
    """A dataset as loaded from disk: uint8 images [N, C, H, W] (or a lazy Dataset) and int64 labels [N]."""

    train_x: torch.Tensor | Dataset
    train_y: torch.Tensor
    test_x: torch.Tensor | Dataset
    test_y: torch.Tensor
    classes: Sequence[str]
    val_x: torch.Tensor | Dataset | None = None  # an explicit validation split; else split off the training set
    val_y: torch.Tensor | None = None


class _Subset(Dataset):
    def __init__(self, base: torch.Tensor | Dataset, index: torch.Tensor) -> None:
        self.base, self.index = base, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.base[int(self.index[i])]


def _take(x: torch.Tensor | Dataset, index: torch.Tensor) -> torch.Tensor | Dataset:
    return x[index] if isinstance(x, torch.Tensor) else _Subset(x, index)


def _mix(*parts: int) -> int:
    """A stable 63-bit seed from integers, e.g. (seed, epoch), for generators."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p + 0x9E3779B97F4A7C15)) * 1099511628211) % (1 << 63)
    return h


class ImageData:
    """Base for image-classification datasets. Keys mirror the `data` config group."""

    name = "images"

    def __init__(self, root: str, download: bool, batch_size: int, eval_batch_size: int, val_fraction: float,
                 split_seed: int, augment: dict, num_workers: int, limit: int | None, overfit_batches: int,
                 in_memory: bool | str = True, max_memory_mb: int = 2048,
                 classes: Sequence[str | int] | None = None) -> None:
        self.root, self.download = root, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.crop_padding, self.hflip = int(augment["crop_padding"]), bool(augment["hflip"])
        self.num_workers, self.limit, self.overfit_batches = num_workers, limit, overfit_batches
        self.in_memory, self.max_memory_mb = in_memory, max_memory_mb
        self.keep_classes = None if classes is None else list(classes)
        self.device = torch.device("cpu")
        self.memory_format = torch.contiguous_format  # the engine sets channels_last for NHWC conv nets
        self.splits: dict[str, tuple[torch.Tensor | Dataset, torch.Tensor]] = {}
        self._ready: dict[tuple[str, int], tuple[torch.Tensor, bool]] = {}  # see _prepared
        self.rank, self.world = 0, 1  # see shard

    # -- implemented by each dataset ------------------------------------------------------------------------------
    def load(self) -> Arrays:
        raise NotImplementedError

    # -- the contract used by the engine --------------------------------------------------------------------------
    def setup(self, device: torch.device) -> "ImageData":
        """Load, split, compute normalization statistics and move to `device`. Idempotent."""
        if self.splits:
            return self
        arrays = self.load()
        if self.keep_classes is not None:
            arrays = _select_classes(arrays, self.keep_classes)
        train_x, train_y = arrays.train_x, arrays.train_y
        if arrays.val_x is None:
            # Fixed by split_seed, so changing trainer.seed never moves images between train and val.
            perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.split_seed))
            n_val = max(1, int(round(len(train_y) * self.val_fraction)))
            val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
            val = (_take(train_x, val_idx), train_y[val_idx])
            train_x, train_y = _take(train_x, train_idx), train_y[train_idx]
        else:
            val = (arrays.val_x, arrays.val_y)
        if self.limit:
            keep = torch.arange(min(self.limit, len(train_y)))
            train_x, train_y = _take(train_x, keep), train_y[keep]
        if self.overfit_batches:
            keep = torch.arange(min(self.overfit_batches * self.batch_size, len(train_y)))
            train_x, train_y = _take(train_x, keep), train_y[keep]
            val = (train_x, train_y)
        if len(train_y) == 0:
            raise UserError(f"no training images left of {len(arrays.train_y)} after holding out "
                            f"{len(val[1])} for validation; lower data.val_fraction or add images", key="data")
        self.splits = {"train": (train_x, train_y), "val": val, "test": (arrays.test_x, arrays.test_y)}
        self.classes = list(arrays.classes)
        sample = train_x[0]
        self.in_shape = tuple(int(s) for s in sample.shape)  # (C, H, W)
        self.normalize = self._statistics(train_x)
        self.resident = isinstance(train_x, torch.Tensor) and self._fits()
        self.device = device
        if self.resident:
            self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}
        self.normalize.to(device)
        log.info("data %s: train %d, val %d, test %d images of shape %s, %d classes, %s", self.name,
                 len(train_y), len(val[1]), len(arrays.test_y), self.in_shape, self.num_classes,
                 "resident on " + str(device) if self.resident else "streamed by a DataLoader")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def spec(self) -> dict:
        """What models and objectives are completed with (see nnctl.spec)."""
        return {"input": "image", "target": "class", "in_shape": self.in_shape, "num_classes": self.num_classes,
                "classes": list(self.classes), "pixel_mean": self.normalize.mean, "pixel_std": self.normalize.std}

    def shard(self, rank: int, world: int) -> "ImageData":
        """Yield only process `rank`'s share of each batch: batch_size (the global batch) must divide by `world`.
        Every process draws the same order and augmentation parameters and gathers its own samples."""
        self.rank, self.world = rank, world
        return self

    def num_batches(self, split: str) -> int:
        n = len(self.splits[split][1])
        return n // self.batch_size if split == "train" else math.ceil(n / self.eval_batch_size)

    def sample_images(self, n: int) -> torch.Tensor:
        """The first `n` training images, normalized and unaugmented, for data-dependent initialization."""
        x, _ = self.splits["train"]
        n = min(n, len(x))
        batch = x[:n] if isinstance(x, torch.Tensor) else torch.stack([x[i] for i in range(n)])
        return self.normalize(batch.to(self.device))

    def train_batches(self, epoch: int, seed: int, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Augmented, normalized training batches [start, stop) of `epoch` (drop_last, shuffled); with `shard`,
        this process's columns of each."""
        x, y = self.splits["train"]
        n_batches = self.num_batches("train")
        stop = n_batches if stop is None else min(stop, n_batches)
        if self.overfit_batches:
            order = torch.arange(len(y))
        else:
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(_mix(seed, epoch)))
        order = self._mine(order[: n_batches * self.batch_size].view(n_batches, self.batch_size)[start:stop])
        if self.overfit_batches or not (self.crop_padding > 0 or self.hflip):
            return self._plain_batches("train", order)
        return self._augmented_batches(order, _mix(seed, epoch), start, stop)

    def eval_batches(self, split: str, stop: int | None = None) -> Iterator[Batch]:
        """Normalized, unaugmented batches of `split` ('val' or 'test') in order; with `shard`, this process's
        part of each (near-equal parts: every sample is evaluated once across the processes)."""
        order = torch.arange(len(self.splits[split][1])).split(self.eval_batch_size)[:stop]
        if self.world > 1:
            order = [idx.tensor_split(self.world)[self.rank] for idx in order]
        return self._plain_batches(split, order)

    # -- internals ------------------------------------------------------------------------------------------------
    def _mine(self, blocks: torch.Tensor) -> torch.Tensor:
        """[batches, B] -> this process's columns [batches, B / world]."""
        if self.world == 1:
            return blocks
        per = self.batch_size // self.world
        return blocks[:, self.rank * per:(self.rank + 1) * per]

    def _plain_batches(self, split: str, order: Sequence[torch.Tensor]) -> Iterator[Batch]:
        """Unaugmented batches: slices of the split normalized once when it allows, else normalized per batch."""
        x, y = self.splits[split]
        x, normalized = self._prepared(split, 0) if self.resident else (x, False)
        batches = self._batches(x, y, order)
        if normalized and self.memory_format is torch.contiguous_format:
            return batches  # rows gathered from a contiguous tensor: already normalized and contiguous, as they come
        return (((xb if normalized else self.normalize(xb)).contiguous(memory_format=self.memory_format), yb)
                for xb, yb in batches)

    def _augmented_batches(self, order: torch.Tensor, seed: int, start: int, stop: int) -> Iterator[Batch]:
        """Training batches [start, stop) in `order` [batches, B / world], randomly cropped and flipped."""
        x, y = self.splits["train"]
        n_batches = self.num_batches("train")
        # One draw per position in the epoch, from one (seed, epoch) generator: a sample's augmentation does not
        # depend on how the batch is split over processes, nor on where a resumed run starts.
        gen = torch.Generator(device=self.device).manual_seed(seed)
        draws = draw_crop_flip(n_batches * self.batch_size, self.crop_padding, self.hflip, gen, self.device)
        positions = self._mine(torch.arange(n_batches * self.batch_size, device=self.device)
                               .view(n_batches, self.batch_size)[start:stop])  # [batches, B / world]
        # resident: the split is padded (and normalized, when it fits) once; streamed: each batch is padded here
        x, normalized = self._prepared("train", self.crop_padding) if self.resident else (x, False)
        for pos, (xb, yb) in zip(positions, self._batches(x, y, order)):
            dy, dx, flip = (d if d is None else d[pos] for d in draws)
            xb = apply_crop_flip(xb, self.crop_padding, dy, dx, flip, padded=self.resident)
            yield (xb if normalized else self.normalize(xb)).contiguous(memory_format=self.memory_format), yb

    def _prepared(self, split: str, padding: int) -> tuple[torch.Tensor, bool]:
        """The resident `split` zero-padded by `padding` and, when the float copy (4x the uint8 bytes) fits the
        max_memory_mb budget, normalized; made once on first use. Returns (images, normalized). Batches then skip
        the per-batch padding and the three normalization passes: most of the data work per step of a small model.
        Padding before normalizing keeps the fill black, exactly as padding each uint8 batch would."""
        if (split, padding) not in self._ready:
            x = self.splits[split][0]
            x = F.pad(x, (padding,) * 4) if padding > 0 else x  # [N, C, H+2p, W+2p]
            fits = 4 * x.numel() <= self.max_memory_mb * 2**20
            self._ready[split, padding] = (self.normalize(x), True) if fits else (x, False)
        return self._ready[split, padding]

    def _batches(self, x, y, order: Sequence[torch.Tensor]) -> Iterator[Batch]:
        """(x[idx], y[idx]) for each index block `idx` of `order`."""
        if self.resident:
            # the indices go where the split lives, up front (resident on a GPU; on the CPU `to` is a no-op):
            # the epoch's blocks [batches, B] in one transfer, evaluation's unequal blocks one by one
            order = (order.to(x.device, non_blocking=True) if isinstance(order, torch.Tensor)
                     else [idx.to(x.device, non_blocking=True) for idx in order])
            # slices of the resident tensors, gathered in C as the loop asks: no Python frame per batch
            return zip(map(x.__getitem__, order), map(y.__getitem__, order))
        return self._streamed(x, y, order)

    def _streamed(self, dataset: Dataset, y: torch.Tensor, order: Sequence[torch.Tensor]) -> Iterator[Batch]:
        """DataLoader path: workers decode images in parallel; the batch blocks are exactly `order`, so batch
        order and contents match the resident path."""
        blocks = [idx.tolist() for idx in order]
        loader = DataLoader(dataset, batch_sampler=blocks, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        try:
            for xb, idx in zip(loader, order):
                yield xb.to(self.device, non_blocking=True), y[idx].to(self.device, non_blocking=True)
        except UserError as exc:
            # From a worker process the DataLoader re-raises it with the worker's traceback folded into the
            # message, which ends with "...UserError: <the original message>"; keep only that.
            raise UserError(str(exc).rsplit("UserError: ", 1)[-1].strip()) from None

    def _fits(self) -> bool:
        if self.in_memory == "auto":
            n = sum(len(y) for _, y in self.splits.values())
            return n * math.prod(self.in_shape) <= self.max_memory_mb * 2**20
        return bool(self.in_memory)

    def _statistics(self, x: torch.Tensor | Dataset) -> Normalize:
        """Per-channel mean/std of the training images (on at most 10k of them), in [0, 1] units.

        The sample is spread evenly over the set: image folders are sorted by class, so the first N images
        would all come from the first classes."""
        n = len(x)
        if isinstance(x, torch.Tensor):
            index = torch.linspace(0, n - 1, min(n, 10_000)).round().long().unique()
            sample = x[index].float() / 255
        else:  # decoding is slow: fewer images
            index = torch.linspace(0, n - 1, min(n, 2_000)).round().long().unique()
            sample = torch.stack([x[int(i)] for i in index]).float() / 255
        mean = sample.mean(dim=(0, 2, 3))
        std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return Normalize(mean, std)


def _select_classes(arrays: Arrays, wanted: Sequence[str | int]) -> Arrays:
    """Keep the images of `wanted` classes (names or indices) in every split, relabelled 0..k-1 in the order
    given; class names are kept, so a fine-tuning run on a subset still reports real names."""
    names = [str(c) for c in arrays.classes]
    index: list[int] = []
    for c in wanted:
        i = c if isinstance(c, int) and not isinstance(c, bool) else (names.index(str(c)) if str(c) in names
                                                                      else None)
        if i is None or not 0 <= i < len(names):
            raise UserError(f"unknown class {c!r}; this dataset has {len(names)} classes: {', '.join(names)} "
                            f"(give names or indices 0..{len(names) - 1})", key="data.classes")
        index.append(i)
    if len(set(index)) != len(index) or len(index) < 2:
        raise UserError(f"got {list(wanted)}; expected at least two different classes", key="data.classes")
    remap = torch.full((len(names),), -1, dtype=torch.int64)
    remap[torch.tensor(index)] = torch.arange(len(index))

    def pick(x: torch.Tensor | Dataset | None, y: torch.Tensor | None) -> tuple:
        if y is None:
            return x, y
        keep = (remap[y] >= 0).nonzero().flatten()
        return _take(x, keep), remap[y[keep]]

    train, test, val = pick(arrays.train_x, arrays.train_y), pick(arrays.test_x, arrays.test_y), \
        pick(arrays.val_x, arrays.val_y)
    return Arrays(*train, *test, [names[i] for i in index], *val)


def to_tensor_images(images: np.ndarray, channels_last: bool = False) -> torch.Tensor:
    """uint8 array [N, H, W] or [N, H, W, C] (channels_last) -> contiguous uint8 tensor [N, C, H, W]."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # e.g. a view of PIL's or a file's buffer; torch wants writable memory
        images = images.copy()
    t = torch.from_numpy(images)
    if t.ndim == 3:
        return t.unsqueeze(1).contiguous()  # [N, H, W] -> [N, 1, H, W]
    return t.permute(0, 3, 1, 2).contiguous() if channels_last else t.contiguous()
