"""Small datasets written in the real datasets' own on-disk formats, so the real loaders are exercised offline.

Every generator returns the arrays it wrote, so tests can compare what a loader reads with what is on disk.
Images carry a class-dependent pattern (a bright blob at a class-specific place, plus noise) so that a model can
learn them in a few epochs, and every image is unique (the noise), so split tests can tell images apart.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


@dataclass
class Split:
    """What a generator wrote for one split: images as the loader should return them ([N, C, H, W] uint8)."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class DataRoot:
    """A data root with every dataset the loaders know, and the arrays that were written."""

    path: Path
    mnist: dict[str, Split]
    fashion: dict[str, Split]
    cifar10: dict[str, Split]
    cifar100: dict[str, Split]


GzRoot = tuple[Path, dict[str, Split]]  # a data root holding MNIST as .gz IDX files, and what was written
Images = tuple[Path, int]  # an image-folder root and its number of readable images


# -- patterns -----------------------------------------------------------------------------------------------------
def pattern_images(n: int, size: int, channels: int, num_classes: int, seed: int) -> Split:
    """uint8 [N, C, S, S] images: a 6x6 bright blob whose position (and colour) depends on the class, plus noise.

    With 10 classes the positions sit on a 4x4 grid 7-8 px apart, so a crop-shift of a few pixels keeps them
    apart (100 classes overlap: CIFAR-100 fixtures only test the format).
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes  # balanced classes
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, channels, size, size)).astype(np.int32)  # dark noisy background
    grid = int(np.ceil(np.sqrt(num_classes)))
    step = (size - 6) // max(1, grid - 1)
    for i, k in enumerate(y):
        r, c = (k // grid) * step, (k % grid) * step
        colour = 1 + (k % channels)  # which channel is brightest, so colour helps on RGB
        for ch in range(channels):
            x[i, ch, r:r + 6, c:c + 6] += 195 if ch + 1 == colour or channels == 1 else 120
    return Split(np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64))


# -- MNIST-style IDX ----------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic 0x00 0x00 <type 0x08 = uint8> <ndim>, big-endian int32 dims, raw data. `.gz` is gzipped."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + np.ascontiguousarray(array).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_mnist(root: Path, folder: str = "MNIST", gz: bool = False, n_train: int = 200, n_test: int = 50,
               seed: int = 0) -> dict[str, Split]:
    """<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], 28x28 grayscale, 10 classes.

    Magic numbers come out as 0x00000803 (images) and 0x00000801 (labels), as in the real files.
    """
    raw = root / folder / "raw"
    out = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        data = pattern_images(n, 28, 1, 10, s)
        images, labels = MNIST_FILES[split]
        suffix = ".gz" if gz else ""
        write_idx(raw / f"{images}{suffix}", data.x[:, 0])  # IDX images are [N, 28, 28]
        write_idx(raw / f"{labels}{suffix}", data.y.astype(np.uint8))
        out[split] = data
    return out


# -- CIFAR python pickles -----------------------------------------------------------------------------------------
_RECONSTRUCT = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
class Py2Pickler(pickle._Pickler):  # type: ignore[misc]  # the pure-Python pickler lets us change opcodes
    """Pickles like the Python 2 cPickle that wrote CIFAR's files: every `bytes` becomes a py2 `str` opcode
    (so `pickle.load(encoding='bytes')` gives b'data' keys and encoding='latin1' gives 'data'), and numpy
    arrays are rebuilt through numpy.core.multiarray._reconstruct."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj: object, name: str | None = None) -> None:
        if obj is _RECONSTRUCT:  # numpy 2 calls its module numpy._core; the real files say numpy.core
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dump_py2(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    """[N, 3, 32, 32] -> [N, 3072]: each row is the R plane, then G, then B, each row-major (the real layout)."""
    return np.ascontiguousarray(x.reshape(len(x), 3 * 32 * 32))


def make_cifar10(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict[str, Split]:
    """<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} with bytes keys, like the real set."""
    directory = root / "cifar-10-batches-py"
    train, test = pattern_images(n_train, 32, 3, 10, seed), pattern_images(n_test, 32, 3, 10, seed + 1)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        dump_py2({b"batch_label": f"training batch {i} of 5".encode(), b"labels": [int(v) for v in train.y[part]],
                  b"data": _cifar_rows(train.x[part]),
                  b"filenames": [f"img_{j:05d}.png".encode() for j in part]}, directory / f"data_batch_{i}")
    dump_py2({b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in test.y],
              b"data": _cifar_rows(test.x), b"filenames": [f"test_{j:05d}.png".encode() for j in range(n_test)]},
             directory / "test_batch")
    dump_py2({b"num_cases_per_batch": n_train // 5, b"label_names": [n.encode() for n in CIFAR10_NAMES],
              b"num_vis": 3072}, directory / "batches.meta")
    return {"train": train, "test": test}


def make_cifar100(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict[str, Split]:
    """<root>/cifar-100-python/{train, test, meta}: 'fine_labels' (100) and 'coarse_labels' (20)."""
    directory = root / "cifar-100-python"
    out = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        data = pattern_images(n, 32, 3, 100, s)
        dump_py2({b"filenames": [f"{split}_{j:05d}.png".encode() for j in range(n)], b"batch_label": split.encode(),
                  b"fine_labels": [int(v) for v in data.y], b"coarse_labels": [int(v) // 5 for v in data.y],
                  b"data": _cifar_rows(data.x)}, directory / split)
        out[split] = data
    dump_py2({b"fine_label_names": [f"fine{k:02d}".encode() for k in range(100)],
              b"coarse_label_names": [f"coarse{k:02d}".encode() for k in range(20)]}, directory / "meta")
    return out


# -- image folders ------------------------------------------------------------------------------------------------
IMAGE_CLASSES = ["cat", "dog", "frog"]


def _class_image(k: int, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """An RGB [H, W, 3] image dominated by channel k, with noise."""
    h, w = size
    img = rng.integers(0, 70, size=(h, w, 3))
    img[..., k % 3] += 170
    return np.clip(img, 0, 255).astype(np.uint8)


def write_class_images(directory: Path, per_class: int, rng: np.random.Generator) -> int:
    """<directory>/<class>/NNN.{png,jpg}: RGB PNGs, JPEGs and grayscale PNGs of mixed sizes. Returns the count."""
    from PIL import Image

    count = 0
    for k, cls in enumerate(IMAGE_CLASSES):
        (directory / cls).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            size = (24, 24) if j % 2 else (40, 30)  # mixed sizes: the loader resizes
            arr = _class_image(k, rng, size)
            if j % 3 == 2:  # JPEG too, and a grayscale PNG now and then (converted to RGB)
                Image.fromarray(arr).save(directory / cls / f"{j:03d}.jpg", quality=95)
            elif j % 5 == 4:
                Image.fromarray(arr[..., k % 3]).save(directory / cls / f"{j:03d}.png")
            else:
                Image.fromarray(arr).save(directory / cls / f"{j:03d}.png")
            count += 1
    return count


def make_image_folder(root: Path, per_class: int = 12, seed: int = 0, corrupt: bool = True) -> int:
    """<root>/<class>/*.png|jpg, one corrupt `.png` (random bytes) and one non-image file. Returns #good images."""
    rng = np.random.default_rng(seed)
    n = write_class_images(root, per_class, rng)
    if corrupt:
        (root / IMAGE_CLASSES[0] / "corrupt.png").write_bytes(rng.bytes(300))
    (root / IMAGE_CLASSES[1] / "notes.txt").write_text("not an image\n")  # ignored by suffix
    return n


def make_split_image_folder(root: Path, per_class_train: int = 12, per_class_val: int = 4, seed: int = 0) -> None:
    """<root>/{train,val}/<class>/*.png|jpg (no test dir: val doubles as test)."""
    rng = np.random.default_rng(seed)
    write_class_images(root / "train", per_class_train, rng)
    write_class_images(root / "val", per_class_val, rng)


# -- helpers for tests --------------------------------------------------------------------------------------------
def loader_kwargs(root: Path | str, **overrides: object) -> dict:
    """Constructor arguments of nnctl.data.base.ImageData, as the data config group would pass them."""
    kw: dict = dict(root=str(root), download=False, batch_size=16, eval_batch_size=32, val_fraction=0.1,
                    split_seed=0, augment={"crop_padding": 2, "hflip": True}, num_workers=0, limit=None,
                    overfit_batches=0, in_memory=True)
    kw.update(overrides)
    return kw


def run_dirs(root: Path, command: str = "train") -> list[Path]:
    """Single-run dirs of `command` under root/outputs (they hold .hydra/), oldest first."""
    return sorted((p.parent for p in (root / "outputs" / command).glob("*/*/.hydra")), key=lambda p: str(p))


# -- a tiny Hugging Face causal LM --------------------------------------------------------------------------------
INSTRUCTIONS = [("Name the colour of the sky.", "The sky is blue."), ("Name the colour of grass.", "Grass is green."),
                ("Name the colour of snow.", "Snow is white."), ("Name the colour of coal.", "Coal is black.")]


def make_hf_causal_lm(root: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (about 40k parameters) and a byte-level BPE tokenizer trained on the instruction texts,
    saved with save_pretrained into `root`: everything a hub model folder holds, built offline. The model is
    pretrained for a few seconds on the plain texts, so that fine-tuning starts, as it does in practice, from a
    base that knows the words (adapters on a random base barely move its loss)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"{p} {r}" for p, r in INSTRUCTIONS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    model = GPT2LMHeadModel(config)
    ids = torch.tensor(fast(" ".join(f"{p} {r}" for p, r in INSTRUCTIONS) * 4)["input_ids"][:256])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=ids[None, :64], labels=ids[None, :64]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root)
    fast.save_pretrained(root)
    return root


def write_instructions(path: Path, copies: int = 16) -> Path:
    """A JSONL of {"prompt", "response"} records (the INSTRUCTIONS repeated)."""
    import json

    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in INSTRUCTIONS * copies))
    return path
