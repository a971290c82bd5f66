"""Data pipeline throughput: augmented training batches per second, nnctl's in-memory path vs torchvision + PIL.

Workload (both sides): 10,000 CIFAR-shaped images (32x32x3 uint8, generated: pixel content does not change the
cost of these transforms), batch 256, shuffled, drop_last, random crop 32 with zero padding 4, random horizontal
flip, conversion to float and per-channel normalization. Images/s counts the images in the batches delivered.

* nnctl -- an `nnctl.data.base.ImageData` subclass whose `load()` returns the generated uint8 tensor, built from
  the real data=cifar10 config (batch_size=256), iterated through `train_batches(epoch, seed)`. On first use the
  resident split is zero-padded and normalized once (timed separately and printed: it is paid once per run, like
  decoding); each batch is then an index gather plus one gather that applies crop and flip together. Runs in the
  main process with torch's default intra-op threads.
* torchvision -- what a typical PyTorch user writes: a Dataset that holds the images as a HWC uint8 array and
  does `PIL.Image.fromarray` + `transforms.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(),
  ToTensor(), Normalize(mean, std)])` per image (exactly torchvision.datasets.CIFAR10's __getitem__), batched by a
  DataLoader(batch_size=256, shuffle=True, drop_last=True) with num_workers 0, 1 and 2 (persistent workers,
  started and warmed up before timing, so worker start-up is not counted against it). The best worker count
  is the reference.

Each repeat times one full epoch of every contender, in alternating order; the ratio is
median(nnctl images/s) / median(best torchvision images/s). Goal: >= 5x.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bench._common import base_parser, compose, cpu_count, interleaved, median, table, verdict, write_result
from nnctl.data.base import Arrays, ImageData

NAME = "data_pipeline"
GOAL = 5.0
N_IMAGES, BATCH = 10_000, 256


def generated_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


class GeneratedCIFAR(ImageData):
    """CIFAR-shaped generated images; the whole set is the training split (a tiny explicit val/test split)."""

    name = "generated_cifar"

    def __init__(self, n_images: int = N_IMAGES, **kw: Any) -> None:
        super().__init__(**kw)
        self.n_images = n_images

    def load(self) -> Arrays:
        x, y = generated_images(self.n_images)
        return Arrays(x, y, x[:BATCH], y[:BATCH], [str(i) for i in range(10)], val_x=x[:BATCH], val_y=y[:BATCH])


class PILImages(Dataset):
    """torchvision.datasets.CIFAR10's __getitem__: HWC uint8 array -> PIL image -> transform."""

    def __init__(self, data: np.ndarray, targets: list[int], transform: Callable) -> None:
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def nnctl_data() -> ImageData:
    from hydra.utils import instantiate

    cfg = compose(["data=cifar10", f"data.batch_size={BATCH}", "data.augment.crop_padding=4",
                   "data.augment.hflip=true", "paths.run_dir=unused"])
    data = instantiate(cfg.data, _target_=f"{__name__}.GeneratedCIFAR", _convert_="all")
    return data.setup(torch.device("cpu"))


def torchvision_loader(workers: int, mean: list[float], std: list[float]) -> DataLoader:
    from torchvision import transforms

    x, y = generated_images(N_IMAGES)
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    dataset = PILImages(x.permute(0, 2, 3, 1).contiguous().numpy(), y.tolist(), transform)
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--repeats", type=int, help="timed epochs per contender (default 5, --quick 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--threads", type=int, default=cpu_count(), help="torch.set_num_threads (main process)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    started = time.perf_counter()

    data = nnctl_data()
    mean = [float(-s / (255 * k)) for s, k in zip(data.normalize.shift.flatten(), data.normalize.scale.flatten())]
    std = [float(1 / (255 * k)) for k in data.normalize.scale.flatten()]
    epoch = {"n": 0}

    def nnctl_epoch() -> float:
        epoch["n"] += 1
        start, n = time.perf_counter(), 0
        for xb, yb in data.train_batches(epoch["n"], seed=0):
            n += len(yb)
        return n / (time.perf_counter() - start)

    loaders = {w: torchvision_loader(w, mean, std) for w in args.workers}

    def tv_epoch(loader: DataLoader) -> Callable[[], float]:
        def run() -> float:
            start, n = time.perf_counter(), 0
            for xb, yb in loader:
                n += len(yb)
            return n / (time.perf_counter() - start)
        return run

    contenders: dict[str, Callable[[], float]] = {"nnctl": nnctl_epoch}
    for w, loader in loaders.items():
        contenders[f"torchvision, {w} worker(s)"] = tv_epoch(loader)
    print(f"warm-up: one epoch each (starts the persistent DataLoader workers); then {repeats} timed epochs each")
    prepare = time.perf_counter()
    data._prepared("train", data.crop_padding)
    prepare = time.perf_counter() - prepare
    print(f"nnctl one-time preparation (pad + normalize the resident split): {prepare:.3f} s")
    for run in contenders.values():
        run()
    rates = interleaved(contenders, repeats)
    med = {k: median(v) for k, v in rates.items()}
    best_tv = max((k for k in med if k != "nnctl"), key=med.get)
    ratio = med["nnctl"] / med[best_tv]
    rows = [(k, med[k], min(v), max(v), med[k] / med[best_tv]) for k, v in rates.items()]
    text = table(["pipeline", "images/s (median)", "min", "max", "vs best torchvision"], rows)
    print("\n" + text)
    goal = f"nnctl in-memory augmented batches >= {GOAL:.0f}x the images/s of torchvision+PIL+DataLoader " \
           "(best worker count)"
    met = ratio >= GOAL
    print(f"best torchvision: {best_tv}; nnctl / best = {ratio:.2f}x")
    print(f"goal: {goal}: {verdict(met)}")
    result = {"goal": goal, "met": met, "quick": args.quick, "repeats": repeats, "table": text, "images_per_epoch": N_IMAGES,
              "batch_size": BATCH, "torch_threads": torch.get_num_threads(), "best_torchvision": best_tv,
              "ratio": ratio, "images_per_s_median": med, "images_per_s_all": rates,
              "prepare_s": prepare, "seconds": round(time.perf_counter() - started, 1),
              "headline": f"nnctl {med['nnctl']:,.0f} img/s vs {best_tv} {med[best_tv]:,.0f} img/s: {ratio:.1f}x"}
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
