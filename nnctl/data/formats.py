"""Readers for the datasets' own on-disk formats (IDX for MNIST-style, pickled batches for CIFAR).

CIFAR's batches are Python pickles; they are read with an unpickler that can only rebuild plain containers and
numpy arrays, so a tampered file cannot run code.
"""
from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from nnctl.errors import UserError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz): magic 0x0000 <dtype> <ndim>, big-endian dims, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # a damaged .gz stream raises zlib.error, not OSError
        raise UserError(f"cannot read IDX file {path}: {exc}; delete it and let nnctl download it again") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise UserError(f"{path} is truncated or corrupt ({len(body)} bytes of data, expected {expected})")
    return np.frombuffer(body, dtype=dtype).reshape(tuple(int(d) for d in dims)).astype(dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
    """Allows only what CIFAR's batches contain: numpy arrays rebuilt from bytes."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys.

    The real files are Python 2 pickles: with encoding='latin1' their py2 `str` keys load as str ('data'). A file
    re-pickled from Python 3 after loading with encoding='bytes' has real bytes keys (b'data'); both are accepted.
    """
    with open(path, "rb") as f:
        entry = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    if not isinstance(entry, dict):
        raise TypeError(f"expected a dict, got {type(entry).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch -> (images uint8 [N, 3, 32, 32], labels int64 [N])."""
    try:
        entry = load_pickle(path)
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)  # rows are CHW-flattened: 1024 R, then G, then B values
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a readable CIFAR batch ({type(exc).__name__}: {exc}); delete it and "
                        "download again", key="data.root") from exc
    if len(images) != len(labels):
        raise UserError(f"{path} has {len(images)} images but {len(labels)} labels; delete it and download again",
                        key="data.root")
    return images, labels


def class_folders(root: Path, files: str, pattern: str) -> tuple[dict[str, Path], Path, list[str]]:
    """The layout of a user's folder dataset: `<root>/<class>/<files>` or `<root>/{train,val,test}/<class>/`.

    Returns (the split dirs present, the dir holding the training classes, the sorted class names); a missing root or
    one without class folders is a user error naming data.root. `files` ("image files") and `pattern` ("*.png")
    name what belongs inside, for the messages.
    """
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; point data.root at <root>/<class>/{pattern}", key="data.root")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    train_dir = split_dirs.get("train", root)
    # <root>/<class>/ next to <root>/test/: the split dirs are not classes
    classes = sorted(d.name for d in train_dir.iterdir()
                     if d.is_dir() and not d.name.startswith(".") and d.name not in split_dirs)
    if not classes:
        raise UserError(f"{train_dir} has no class folders; expected {train_dir}/<class>/<{files}>", key="data.root")
    return split_dirs, train_dir, classes
