"""Image-classification datasets: each turns its on-disk format into uint8 arrays (see base.ImageData)."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from nnctl.data.base import Arrays, ImageData, to_tensor_images
from nnctl.data.formats import class_folders, load_pickle, read_cifar_batch, read_idx
from nnctl.errors import UserError

log = logging.getLogger(__name__)


def _download(name: str, fetch: Callable[[], Any], looked: list[Path], fix: str) -> None:
    """Run a torchvision download, turning network failures into one actionable line."""
    try:
        fetch()
    except Exception as exc:  # urllib/HTTP/checksum errors all mean "could not get the files"
        where = ", ".join(str(p) for p in looked)
        raise UserError(f"{name} is not on disk (looked in {where}) and the download failed "
                        f"({type(exc).__name__}: {exc}). {fix}", key="data.root") from exc


def _missing(name: str, looked: list[Path], fix: str) -> UserError:
    where = ", ".join(str(p) for p in looked)
    return UserError(f"{name} not found (looked in {where}); run once online with data.download=true, or {fix}",
                     key="data.root")


class Digits(ImageData):
    """scikit-learn's bundled 8x8 digits; the test split is a fixed holdout of `test_fraction`."""

    name = "digits"

    def __init__(self, test_fraction: float = 0.2, **kw: Any) -> None:
        super().__init__(**kw)
        self.test_fraction = test_fraction

    def load(self) -> Arrays:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
        x, y = to_tensor_images(images), torch.as_tensor(bunch.target, dtype=torch.int64)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed + 1))
        n_test = int(round(len(y) * self.test_fraction))
        test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
        return Arrays(x[train], y[train], x[test], y[test], [str(i) for i in range(10)])


class Synthetic(ImageData):
    """Seeded blobs: a smooth random prototype per class plus Gaussian noise."""

    name = "synthetic"

    def __init__(self, num_samples: int, image_size: int, channels: int, num_classes: int, noise: float,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.num_samples, self.image_size, self.channels = num_samples, image_size, channels
        self.n_classes, self.noise = num_classes, noise

    def load(self) -> Arrays:
        g = torch.Generator().manual_seed(self.split_seed)
        s, c, k = self.image_size, self.channels, self.n_classes
        coarse = torch.randn(k, c, 4, 4, generator=g)
        protos = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False)

        def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, k, (n,), generator=g)
            x = protos[y] + self.noise * torch.randn(n, c, s, s, generator=g)  # [N, C, S, S]
            return (x * 48 + 128).clamp(0, 255).to(torch.uint8), y

        (train_x, train_y), (test_x, test_y) = sample(self.num_samples), sample(max(1, self.num_samples // 4))
        return Arrays(train_x, train_y, test_x, test_y, [f"class{i}" for i in range(k)])


class MNIST(ImageData):
    """MNIST from IDX files (plain or .gz) in <root>/MNIST/raw."""

    name = "mnist"
    folder = "MNIST"
    extra_dirs: tuple[str, ...] = ()
    classes = [str(i) for i in range(10)]
    files = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def _find(self, directory: Path, stem: str) -> Path | None:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def _locate(self) -> Path | None:
        for directory in self._dirs():
            if all(self._find(directory, stem) for pair in self.files.values() for stem in pair):
                return directory
        return None

    def _dirs(self) -> list[Path]:
        return [Path(self.root) / self.folder / "raw", *map(Path, self.extra_dirs)]

    def load(self) -> Arrays:
        directory = self._locate()
        if directory is None and self.download:
            import torchvision

            fetch = getattr(torchvision.datasets, self.folder)
            _download(self.name, lambda: fetch(self.root, train=True, download=True), self._dirs(),
                      f"Copy the four IDX files into {self._dirs()[0]}.")
            directory = self._locate()
        if directory is None:
            raise _missing(self.name, self._dirs(), f"copy the four IDX files into {self._dirs()[0]}")
        out = {}
        for split, (images, labels) in self.files.items():
            x = read_idx(self._find(directory, images))  # [N, 28, 28] uint8
            y = read_idx(self._find(directory, labels)).astype(np.int64)
            if len(x) != len(y):
                raise UserError(f"{directory}: {split} has {len(x)} images but {len(y)} labels", key="data.root")
            out[split] = (to_tensor_images(x), torch.from_numpy(y))
        return Arrays(*out["train"], *out["test"], self.classes)


class FashionMNIST(MNIST):
    """Fashion-MNIST; also reads Debian's dataset-fashion-mnist package."""

    name = "fashion_mnist"
    folder = "FashionMNIST"
    extra_dirs = ("/usr/share/datasets/fashion-mnist",)
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]


class CIFAR10(ImageData):
    """CIFAR-10 from the python batches in <root>/cifar-10-batches-py."""

    name = "cifar10"
    folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    meta = ("batches.meta", "label_names")
    torchvision_name = "CIFAR10"

    def load(self) -> Arrays:
        directory = Path(self.root) / self.folder
        needed = [directory / f for f in self.train_files + self.test_files]
        if not all(p.is_file() for p in needed) and self.download:
            import torchvision

            fetch = getattr(torchvision.datasets, self.torchvision_name)
            _download(self.name, lambda: fetch(self.root, train=True, download=True), [directory],
                      f"Extract the python version of {self.name} into {directory}.")
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise _missing(self.name, [directory], f"extract the python version into {directory} "
                                                   f"(missing: {', '.join(missing)})")
        train = [read_cifar_batch(directory / f) for f in self.train_files]
        test = [read_cifar_batch(directory / f) for f in self.test_files]

        def join(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                    torch.from_numpy(np.concatenate([p[1] for p in parts])))

        train_x, train_y = join(train)
        test_x, test_y = join(test)
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        return Arrays(train_x, train_y, test_x, test_y, self._class_names(directory, num_classes))

    def _class_names(self, directory: Path, num_classes: int) -> list[str]:
        """Names from the meta file; numbers when it is missing, unreadable or does not fit the labels."""
        path, key = directory / self.meta[0], self.meta[1]
        if path.is_file():
            try:
                names = load_pickle(path).get(key)
            except (OSError, EOFError, pickle.UnpicklingError, TypeError, ValueError, AttributeError) as exc:
                log.warning("cannot read class names from %s (%s); using numbers", path, exc)
                names = None
            if names and len(names) >= num_classes:
                return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
        n = 100 if self.torchvision_name == "CIFAR100" else 10
        return [str(i) for i in range(max(n, num_classes))]


class CIFAR100(CIFAR10):
    """CIFAR-100 (fine labels) from <root>/cifar-100-python."""

    name = "cifar100"
    folder = "cifar-100-python"
    train_files = ["train"]
    test_files = ["test"]
    meta = ("meta", "fine_label_names")
    torchvision_name = "CIFAR100"


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class _ImageFiles(Dataset):
    """Decodes and resizes image files to uint8 [C, S, S]. Files that fail the header check were dropped by
    `ImageFolder._scan`; one that fails the full decode here is a UserError naming it."""

    def __init__(self, paths: list[Path], size: int, channels: int) -> None:
        self.paths, self.size, self.mode = paths, size, "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                im = im.convert(self.mode).resize((self.size, self.size), Image.BILINEAR)
                arr = np.array(im, dtype=np.uint8)  # a copy: PIL's buffer is read-only
        except (OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"cannot decode {self.paths[i]} ({exc}); delete or replace it", key="data.root") from exc
        return to_tensor_images(arr[None], channels_last=arr.ndim == 3)[0]


class ImageFolder(ImageData):
    """A user's image tree: <root>/<class>/* with a val_fraction split, or <root>/{train,val[,test]}/<class>/*."""

    name = "image_folder"

    def __init__(self, image_size: int, channels: int, **kw: Any) -> None:
        super().__init__(**kw)
        if channels not in (1, 3):
            raise UserError(f"got {channels}; expected 1 (grayscale) or 3 (RGB)", key="data.channels")
        self.image_size, self.channels = image_size, channels

    def load(self) -> Arrays:
        split_dirs, train_dir, classes = class_folders(Path(self.root), "image files", "*.png")
        scans = {"train": self._scan(train_dir, classes)}
        scans.update({s: self._scan(split_dirs[s], classes) for s in ("val", "test") if s in split_dirs})
        # Decode everything up front when it fits (in_memory=true, or auto within max_memory_mb for all splits
        # together), so the base class can hold it as one tensor; otherwise a DataLoader decodes per batch.
        n_bytes = sum(len(paths) for paths, _ in scans.values()) * self.channels * self.image_size ** 2
        decode = self.in_memory is True or (self.in_memory == "auto" and n_bytes <= self.max_memory_mb * 2**20)
        loaded = {s: self._materialize(paths, y, decode) for s, (paths, y) in scans.items()}
        train = loaded["train"]
        val, test = loaded.get("val"), loaded.get("test")
        if val is None and test is None:  # no held-out dirs at all: the validation split doubles as the test split
            perm = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(self.split_seed))
            n_val = max(1, int(round(len(train[1]) * self.val_fraction)))
            val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
            val = (_index(train[0], val_idx), train[1][val_idx])
            train = (_index(train[0], train_idx), train[1][train_idx])
        if test is None:
            test = val
        arrays = Arrays(train[0], train[1], test[0], test[1], classes)
        if val is not None:  # else (only a test dir) the base class splits val off train by val_fraction
            arrays.val_x, arrays.val_y = val
        return arrays

    def _scan(self, directory: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
        """List readable images per class; corrupt files are skipped with a warning and counted."""
        from PIL import Image, UnidentifiedImageError

        paths, labels, bad = [], [], []
        for label, cls in enumerate(classes):
            for p in sorted((directory / cls).glob("*")):
                if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                    continue
                try:
                    with Image.open(p) as im:
                        im.verify()  # header + structure check without a full decode
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                    bad.append(p)
                    continue
                paths.append(p)
                labels.append(label)
        extra = sorted(d.name for d in directory.iterdir() if d.is_dir() and d.name not in classes
                       and not d.name.startswith(".") and d.name not in ("train", "val", "test"))
        if extra:
            log.warning("ignored class folder(s) %s under %s: not among the training classes", extra, directory)
        if bad:
            log.warning("skipped %d unreadable image file(s) under %s, e.g. %s", len(bad), directory, bad[0])
        if not paths:
            raise UserError(f"no readable images under {directory}/<class>/", key="data.root")
        return paths, labels

    def _materialize(self, paths: list[Path], labels: list[int],
                     decode: bool) -> tuple[Dataset | torch.Tensor, torch.Tensor]:
        """A lazy Dataset over the files, or all of them decoded into one uint8 tensor [N, C, S, S]."""
        files = _ImageFiles(paths, self.image_size, self.channels)
        y = torch.tensor(labels, dtype=torch.int64)
        if not decode:
            return files, y
        x, ok = _decode_all(files)
        return x[ok], y[ok]


def _index(x: Dataset | torch.Tensor, idx: torch.Tensor) -> Dataset | torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x[idx]
    return _ImageFiles([x.paths[int(i)] for i in idx], x.size, 1 if x.mode == "L" else 3)


def _decode_all(files: _ImageFiles) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every file once into one uint8 tensor [N, C, S, S], and a mask of the files that decoded.

    A file can pass the header check and still fail here (e.g. a truncated JPEG): it is skipped with a warning.
    """
    out = torch.empty(len(files), 1 if files.mode == "L" else 3, files.size, files.size, dtype=torch.uint8)
    ok = torch.ones(len(files), dtype=torch.bool)
    for i in range(len(files)):
        try:
            out[i] = files[i]
        except UserError:
            ok[i] = False
    if not ok.all():
        bad = [files.paths[i] for i in (~ok).nonzero().flatten().tolist()]
        log.warning("skipped %d image file(s) that failed to decode, e.g. %s", len(bad), bad[0])
        if ok.sum() == 0:
            raise UserError(f"none of the {len(files)} images under {bad[0].parent.parent} could be decoded",
                            key="data.root")
    return out, ok
