"""The data layer: every loader on files in the datasets' real formats, splits, the batch pipeline, augmentation."""
from __future__ import annotations

import gzip
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fixtures as fx
from nnctl.data.augment import random_crop, random_hflip
from nnctl.data.base import ImageData
from nnctl.data.formats import read_cifar_batch, read_idx
from nnctl.data.vision import CIFAR10, CIFAR100, MNIST, Digits, FashionMNIST, ImageFolder, Synthetic
from nnctl.errors import UserError

CPU = torch.device("cpu")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def rows(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> set[tuple[int, bytes]]:
    """Images with their labels as a set: compares splits regardless of order (every fixture image is unique)."""
    x, y = torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y))
    out = {(int(label), img.numpy().tobytes()) for img, label in zip(x, y)}
    assert len(out) == len(y), "fixture images should be unique"
    return out


def train_plus_val(data: ImageData) -> set[tuple[int, bytes]]:
    (tx, ty), (vx, vy) = data.splits["train"], data.splits["val"]
    return rows(torch.cat([tx, vx]), torch.cat([ty, vy]))


def batches(it) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in it]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) and len(a) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, rtol=0, atol=1e-6)


# -- MNIST / Fashion-MNIST (IDX) ------------------------------------------------------------------------------------
def test_fixture_idx_files_have_the_real_magic_numbers(data_root: fx.DataRoot, mnist_gz_root: fx.GzRoot) -> None:
    raw = data_root.path / "MNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte").read_bytes()[:16] == bytes.fromhex("00000803000000c80000001c0000001c")
    assert (raw / "train-labels-idx1-ubyte").read_bytes()[:8] == bytes.fromhex("00000801000000c8")
    with gzip.open(mnist_gz_root[0] / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz") as f:
        assert f.read(16) == bytes.fromhex("00000803000000320000001c0000001c")  # 50 x 28 x 28


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_loads_idx_files(gz: bool, data_root: fx.DataRoot, mnist_gz_root: fx.GzRoot) -> None:
    root, written = mnist_gz_root if gz else (data_root.path, data_root.mnist)
    data = MNIST(**fx.loader_kwargs(root)).setup(CPU)
    assert data.in_shape == (1, 28, 28)
    assert data.classes == [str(i) for i in range(10)] and data.num_classes == 10
    (tx, ty), (vx, vy), (sx, sy) = data.splits["train"], data.splits["val"], data.splits["test"]
    assert tx.dtype == vx.dtype == sx.dtype == torch.uint8 and ty.dtype == sy.dtype == torch.int64
    assert (len(ty), len(vy), len(sy)) == (180, 20, 50)  # 10% of 200 held out for validation
    assert tuple(tx.shape) == (180, 1, 28, 28)
    assert train_plus_val(data) == rows(written["train"].x, written["train"].y)
    assert torch.equal(sx, torch.from_numpy(written["test"].x)) and torch.equal(sy, torch.from_numpy(written["test"].y))


def test_fashion_mnist_reads_gz_and_names_classes(data_root: fx.DataRoot) -> None:
    data = FashionMNIST(**fx.loader_kwargs(data_root.path)).setup(CPU)
    assert data.classes == fx.FASHION_NAMES
    assert train_plus_val(data) == rows(data_root.fashion["train"].x, data_root.fashion["train"].y)
    assert torch.equal(data.splits["test"][0], torch.from_numpy(data_root.fashion["test"].x))


def test_fashion_mnist_falls_back_to_extra_dirs(data_root: fx.DataRoot, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The Debian package's dir is one of extra_dirs; point it at the fixture to test the mechanism anywhere.
    monkeypatch.setattr(FashionMNIST, "extra_dirs", (str(data_root.path / "FashionMNIST" / "raw"),))
    data = FashionMNIST(**fx.loader_kwargs(tmp_path / "empty")).setup(CPU)
    assert torch.equal(data.splits["test"][0], torch.from_numpy(data_root.fashion["test"].x))


@pytest.mark.skipif(not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_reads_debian_package_when_root_is_empty(tmp_path: Path) -> None:
    data = FashionMNIST(**fx.loader_kwargs(tmp_path / "empty", download=False)).setup(CPU)
    assert data._locate() == DEBIAN_FASHION
    ty, vy, sy = (data.splits[s][1] for s in ("train", "val", "test"))
    assert (len(ty), len(vy), len(sy)) == (54_000, 6_000, 10_000)
    assert torch.cat([ty, vy]).bincount().tolist() == [6000] * 10  # the real set is balanced
    assert data.in_shape == (1, 28, 28) and data.classes[9] == "Ankle boot"


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "x-idx3-ubyte"
    fx.write_idx(good, np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
    assert read_idx(good).tolist() == np.arange(24).reshape(2, 3, 4).tolist()
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(UserError, match="truncated"):
        read_idx(truncated)
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x03" + good.read_bytes()[4:])
    with pytest.raises(UserError, match="magic"):
        read_idx(bad_magic)
    not_gzip = tmp_path / "fake.gz"
    not_gzip.write_bytes(b"\x1f\x8b" + os.urandom(64))  # gzip magic, garbage stream
    with pytest.raises(UserError, match="fake.gz"):
        read_idx(not_gzip)


# -- CIFAR (python pickles) -----------------------------------------------------------------------------------------
def test_fixture_cifar_batches_match_the_real_pickle_layout(data_root: fx.DataRoot) -> None:
    # The real files are Python 2 pickles: read with encoding='bytes' their keys are bytes, with 'latin1' str.
    path = data_root.path / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as f:
        as_bytes = pickle.load(f, encoding="bytes")
    assert set(as_bytes) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert as_bytes[b"data"].dtype == np.uint8 and as_bytes[b"data"].shape == (40, 3072)
    with open(path, "rb") as f:
        as_str = pickle.load(f, encoding="latin1")
    assert isinstance(as_str["labels"], list) and as_str["labels"] == as_bytes[b"labels"]
    assert b"numpy.core.multiarray\n_reconstruct" in path.read_bytes()  # what the real files reference


def test_cifar10_loads_batches_in_chw_order(data_root: fx.DataRoot) -> None:
    data = CIFAR10(**fx.loader_kwargs(data_root.path)).setup(CPU)
    assert data.in_shape == (3, 32, 32) and data.classes == fx.CIFAR10_NAMES
    (tx, ty), (vx, vy), (sx, sy) = data.splits["train"], data.splits["val"], data.splits["test"]
    assert (len(ty), len(vy), len(sy)) == (180, 20, 50)
    assert tx.dtype == torch.uint8 and ty.dtype == torch.int64
    written = data_root.cifar10
    assert train_plus_val(data) == rows(written["train"].x, written["train"].y)  # all five batches joined
    # Pixel-exact: the blob of image 0 sits in its class's channel, so a wrong CHW/HWC reshape would show.
    assert torch.equal(sx, torch.from_numpy(written["test"].x)) and sy.tolist() == written["test"].y.tolist()
    blob = sx[:, :, :, :].float().amax(dim=(2, 3))  # [N, 3] brightest value per channel
    assert bool((blob.argmax(dim=1) == sy % 3).all())


def test_cifar100_uses_fine_labels_and_names(data_root: fx.DataRoot) -> None:
    data = CIFAR100(**fx.loader_kwargs(data_root.path)).setup(CPU)
    assert data.num_classes == 100 and data.classes[:2] == ["fine00", "fine01"]
    sy = data.splits["test"][1]
    assert sy.tolist() == data_root.cifar100["test"].y.tolist() and int(sy.max()) > 19  # fine, not coarse
    assert train_plus_val(data) == rows(data_root.cifar100["train"].x, data_root.cifar100["train"].y)


def test_cifar_also_reads_batches_repickled_with_bytes_keys(data_root: fx.DataRoot, tmp_path: Path) -> None:
    # e.g. loaded with encoding='bytes' and dumped again from Python 3: the keys stay bytes.
    src, dst = data_root.path / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py"
    dst.mkdir()
    for name in ["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))]:
        with open(src / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        with open(dst / name, "wb") as f:
            pickle.dump(entry, f, protocol=4)
    x, y = read_cifar_batch(dst / "test_batch")
    assert np.array_equal(x, data_root.cifar10["test"].x) and y.tolist() == data_root.cifar10["test"].y.tolist()
    data = CIFAR10(**fx.loader_kwargs(tmp_path)).setup(CPU)
    assert data.classes == fx.CIFAR10_NAMES


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, ("touch pwned",))


def test_cifar_refuses_pickles_that_would_run_code(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Evil(), "labels": [0]}))
    with pytest.raises(UserError, match="not a readable CIFAR batch"):
        read_cifar_batch(path)
    assert not (tmp_path / "pwned").exists()


def test_cifar_batch_with_wrong_sizes_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    fx.dump_py2({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, path)
    with pytest.raises(UserError, match="data_batch_1"):
        read_cifar_batch(path)
    fx.dump_py2({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, path)
    with pytest.raises(UserError, match="3 labels"):
        read_cifar_batch(path)


# -- image folders --------------------------------------------------------------------------------------------------
def folder_kwargs(root: Path, **overrides: object) -> dict:
    kw: dict = dict(image_size=16, channels=3, batch_size=8, eval_batch_size=5, val_fraction=0.2)
    return fx.loader_kwargs(root, **{**kw, **overrides})


def test_image_folder_flat_layout_skips_corrupt_file_with_warning(image_folder: fx.Images,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    root, n_good = image_folder
    with caplog.at_level(logging.WARNING, logger="nnctl.data.vision"):
        data = ImageFolder(**folder_kwargs(root)).setup(CPU)
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 1 " in warnings[0] and "corrupt.png" in warnings[0]
    assert data.classes == fx.IMAGE_CLASSES and data.in_shape == (3, 16, 16)
    (tx, ty), (vx, vy), (sx, sy) = data.splits["train"], data.splits["val"], data.splits["test"]
    assert len(ty) + len(vy) == n_good == 36 and len(vy) == round(36 * 0.2)
    assert torch.equal(sx, vx) and torch.equal(sy, vy)  # no held-out dir: val doubles as test
    assert tx.dtype == torch.uint8 and tuple(tx.shape) == (len(ty), 3, 16, 16)
    # Class k's images are dominated by channel k: labels follow the folders and channels are RGB in order.
    means = torch.cat([tx, vx]).float().mean(dim=(2, 3))  # [N, 3]
    labels = torch.cat([ty, vy])
    assert bool((means.gather(1, labels[:, None]) >= means.max(dim=1, keepdim=True).values - 1e-4).all())
    assert rows(tx, ty).isdisjoint(rows(vx, vy))


def test_image_folder_train_val_layout(split_image_folder: Path) -> None:
    data = ImageFolder(**folder_kwargs(split_image_folder)).setup(CPU)
    ty, vy, sy = (data.splits[s][1] for s in ("train", "val", "test"))
    assert (len(ty), len(vy), len(sy)) == (36, 12, 12)  # val comes from val/, not split off train/
    assert vy.bincount().tolist() == [4, 4, 4]
    assert torch.equal(data.splits["test"][0], data.splits["val"][0])


def test_image_folder_with_only_a_test_dir_splits_val_off_the_classes(tmp_path: Path) -> None:
    # <root>/<class>/ beside <root>/test/<class>/: "test" is a split, not a fourth class
    rng = np.random.default_rng(0)
    fx.write_class_images(tmp_path, 10, rng)
    fx.write_class_images(tmp_path / "test", 3, rng)
    data = ImageFolder(**folder_kwargs(tmp_path, val_fraction=0.2)).setup(CPU)
    assert data.classes == fx.IMAGE_CLASSES
    ty, vy, sy = (data.splits[s][1] for s in ("train", "val", "test"))
    assert (len(ty), len(vy), len(sy)) == (24, 6, 9) and sy.bincount().tolist() == [3, 3, 3]


def test_too_few_images_for_a_split_is_a_user_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fx.write_class_images(tmp_path, 1, rng)  # 3 images; val_fraction 0.9 leaves none to train on
    with pytest.raises(UserError, match="no training images left"):
        ImageFolder(**folder_kwargs(tmp_path, val_fraction=0.9)).setup(CPU)


class _SortedByClass(torch.utils.data.Dataset):
    """5000 images, the first half black, the second white: like an image folder sorted by class."""

    def __len__(self) -> int:
        return 5000

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((1, 2, 2), 0 if i < 2500 else 255, dtype=torch.uint8)


def test_normalization_statistics_sample_the_whole_set() -> None:
    data = ImageData(**fx.loader_kwargs("unused"))
    norm = data._statistics(_SortedByClass())
    mean = -norm.shift / (norm.scale * 255)  # shift = -mean/std, scale = 1/(255 std)
    assert abs(float(mean) - 0.5) < 0.01  # not 0.0: the sample must not be only the first class
    x = torch.cat([torch.zeros(15_000, 1, 1, 1), torch.full((15_000, 1, 1, 1), 255.0)]).to(torch.uint8)
    norm = data._statistics(x)
    assert abs(float(-norm.shift / (norm.scale * 255)) - 0.5) < 0.01


def test_image_folder_grayscale_and_streaming(image_folder: fx.Images) -> None:
    root, _ = image_folder
    gray = ImageFolder(**folder_kwargs(root, channels=1)).setup(CPU)
    assert gray.in_shape == (1, 16, 16) and gray.splits["train"][0].shape[1] == 1
    lazy = ImageFolder(**folder_kwargs(root, in_memory=False)).setup(CPU)
    assert not lazy.resident and not isinstance(lazy.splits["train"][0], torch.Tensor)
    with pytest.raises(UserError, match="data.channels"):
        ImageFolder(**folder_kwargs(root, channels=2))


def test_image_folder_skips_truncated_image_that_passes_header_check(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    fx.make_image_folder(tmp_path, per_class=3, corrupt=False)
    bad = tmp_path / "dog" / "002.jpg"
    payload = bad.read_bytes()
    bad.write_bytes(payload[: len(payload) * 2 // 3])  # a valid JPEG header and 2/3 of the scan data
    with Image.open(bad) as im:
        im.verify()  # passes the cheap header check: only a full decode finds the damage
    with caplog.at_level(logging.WARNING, logger="nnctl.data.vision"):
        data = ImageFolder(**folder_kwargs(tmp_path, val_fraction=0.25)).setup(CPU)
    ty, vy = data.splits["train"][1], data.splits["val"][1]
    assert len(ty) + len(vy) == 8 and torch.cat([ty, vy]).bincount().tolist() == [3, 2, 3]
    assert any("002.jpg" in r.getMessage() and "skipped 1" in r.getMessage() for r in caplog.records)
    # streamed, it cannot be dropped mid-epoch: decoding it is a UserError naming the file
    with pytest.raises(UserError, match="cannot decode .*002.jpg"):
        lazy = ImageFolder(**folder_kwargs(tmp_path, val_fraction=0.25, in_memory=False)).setup(CPU)
        for split in ("train", "val"):
            batches(lazy.eval_batches(split))


def test_undecodable_image_in_a_worker_is_one_user_error_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fx.write_class_images(tmp_path / "train", 3, rng)
    fx.write_class_images(tmp_path / "val", 3, rng)
    bad = tmp_path / "val" / "frog" / "002.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size * 2 // 3])  # passes verify(), fails decode
    data = ImageFolder(**folder_kwargs(tmp_path, in_memory=False, num_workers=2)).setup(CPU)
    with pytest.raises(UserError) as err:
        batches(data.eval_batches("val"))
    message = str(err.value)
    assert message.startswith("data.root: cannot decode ") and str(bad) in message and "\n" not in message


def test_image_folder_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"data.root: {tmp_path / 'nope'} is not a directory"):
        ImageFolder(**folder_kwargs(tmp_path / "nope")).setup(CPU)
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        ImageFolder(**folder_kwargs(tmp_path / "flat")).setup(CPU)
    (tmp_path / "flat" / "cls").mkdir()
    (tmp_path / "flat" / "cls" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="no readable images"):
        ImageFolder(**folder_kwargs(tmp_path / "flat")).setup(CPU)


# -- bundled / generated ----------------------------------------------------------------------------------------------
def test_digits_shapes_and_fixed_test_split() -> None:
    data = Digits(test_fraction=0.2, **fx.loader_kwargs("unused")).setup(CPU)
    ty, vy, sy = (data.splits[s][1] for s in ("train", "val", "test"))
    assert len(ty) + len(vy) + len(sy) == 1797 and len(sy) == 359 and len(vy) == 144
    assert data.in_shape == (1, 8, 8) and data.classes == [str(i) for i in range(10)]
    x = data.splits["train"][0]
    assert x.dtype == torch.uint8 and int(x.max()) == 255 and int(x.min()) == 0  # 16 ink levels scaled to 255
    again = Digits(test_fraction=0.2, **fx.loader_kwargs("unused")).setup(CPU)
    assert torch.equal(again.splits["test"][0], data.splits["test"][0])


def test_synthetic_is_seeded() -> None:
    kw = dict(num_samples=100, image_size=12, channels=3, num_classes=4, noise=0.5)
    a = Synthetic(**kw, **fx.loader_kwargs("unused")).setup(CPU)
    assert a.in_shape == (3, 12, 12) and a.classes == ["class0", "class1", "class2", "class3"]
    assert [len(a.splits[s][1]) for s in ("train", "val", "test")] == [90, 10, 25]
    b = Synthetic(**kw, **fx.loader_kwargs("unused")).setup(CPU)
    c = Synthetic(**kw, **fx.loader_kwargs("unused", split_seed=1)).setup(CPU)
    assert torch.equal(a.splits["train"][0], b.splits["train"][0])
    assert not torch.equal(a.splits["train"][0], c.splits["train"][0])


# -- splits ---------------------------------------------------------------------------------------------------------
def test_val_split_is_deterministic_disjoint_and_independent_of_trainer_seed(data_root: fx.DataRoot) -> None:
    torch.manual_seed(1)
    a = MNIST(**fx.loader_kwargs(data_root.path, val_fraction=0.25)).setup(CPU)
    torch.manual_seed(2)  # global RNG state must not matter
    b = MNIST(**fx.loader_kwargs(data_root.path, val_fraction=0.25)).setup(CPU)
    c = MNIST(**fx.loader_kwargs(data_root.path, val_fraction=0.25, split_seed=1)).setup(CPU)
    assert len(a.splits["val"][1]) == 50
    assert torch.equal(a.splits["val"][0], b.splits["val"][0]) and torch.equal(a.splits["val"][1], b.splits["val"][1])
    va, vc = rows(*a.splits["val"]), rows(*c.splits["val"])
    assert va != vc
    assert va.isdisjoint(rows(*a.splits["train"])) and vc.isdisjoint(rows(*c.splits["train"]))


def test_limit_keeps_first_training_images_and_all_val(data_root: fx.DataRoot) -> None:
    full = MNIST(**fx.loader_kwargs(data_root.path)).setup(CPU)
    small = MNIST(**fx.loader_kwargs(data_root.path, limit=30)).setup(CPU)
    assert torch.equal(small.splits["train"][0], full.splits["train"][0][:30])
    assert torch.equal(small.splits["val"][0], full.splits["val"][0])
    assert small.num_batches("train") == 30 // 16


def test_overfit_batches_trains_and_validates_on_the_same_unaugmented_batches(data_root: fx.DataRoot) -> None:
    data = MNIST(**fx.loader_kwargs(data_root.path, overfit_batches=2)).setup(CPU)
    assert len(data.splits["train"][1]) == 32 and torch.equal(data.splits["val"][0], data.splits["train"][0])
    first = batches(data.train_batches(epoch=0, seed=0))
    again = batches(data.train_batches(epoch=5, seed=9))
    assert_same_batches(first, again)  # no shuffling and no augmentation
    torch.testing.assert_close(first[0][0], data.normalize(data.splits["train"][0][:16]))


def test_normalization_standardizes_training_images(data_root: fx.DataRoot) -> None:
    data = CIFAR10(**fx.loader_kwargs(data_root.path)).setup(CPU)
    z = data.normalize(data.splits["train"][0])
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)


# -- the batch pipeline -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_resident_and_dataloader_paths_yield_identical_batches(image_folder: fx.Images, workers: int) -> None:
    root, _ = image_folder
    resident = ImageFolder(**folder_kwargs(root)).setup(CPU)
    streamed = ImageFolder(**folder_kwargs(root, in_memory=False, num_workers=workers)).setup(CPU)
    assert resident.resident and not streamed.resident
    for epoch in (0, 1):
        assert_same_batches(batches(resident.train_batches(epoch, seed=3)),
                            batches(streamed.train_batches(epoch, seed=3)))
    for split in ("val", "test"):
        assert_same_batches(batches(resident.eval_batches(split)), batches(streamed.eval_batches(split)))


def test_tensor_through_dataloader_matches_resident(data_root: fx.DataRoot) -> None:
    resident = MNIST(**fx.loader_kwargs(data_root.path)).setup(CPU)
    streamed = MNIST(**fx.loader_kwargs(data_root.path, in_memory=False)).setup(CPU)
    assert not streamed.resident
    assert_same_batches(batches(resident.train_batches(2, seed=1)), batches(streamed.train_batches(2, seed=1)))


@pytest.mark.parametrize("augment", [{"crop_padding": 0, "hflip": False}, {"crop_padding": 2, "hflip": True}],
                         ids=["plain", "crop-flip"])
def test_batches_from_the_split_prepared_once_equal_per_batch_work(data_root: fx.DataRoot, augment: dict) -> None:
    # A resident split is padded and normalized once and batches are cut from it; the result is bitwise what
    # per-batch padding and normalization give (the path taken when the float copy exceeds max_memory_mb).
    once = MNIST(**fx.loader_kwargs(data_root.path, augment=augment)).setup(CPU)
    per_batch = MNIST(**fx.loader_kwargs(data_root.path, augment=augment, max_memory_mb=0)).setup(CPU)
    for a, b in [(once.train_batches(1, seed=2), per_batch.train_batches(1, seed=2)),
                 (once.eval_batches("test"), per_batch.eval_batches("test"))]:
        a, b = batches(a), batches(b)
        assert len(a) == len(b) > 1 and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                            for (xa, ya), (xb, yb) in zip(a, b))
    pad = augment["crop_padding"]
    assert once._prepared("train", pad)[1] and not per_batch._prepared("train", pad)[1]
    assert once._prepared("train", pad)[0].shape[-1] == 28 + 2 * pad
    assert per_batch.resident  # the budget only decides the float copy, not residency


def test_train_batches_are_a_function_of_seed_epoch_and_index(data_root: fx.DataRoot) -> None:
    data = CIFAR10(**fx.loader_kwargs(data_root.path)).setup(CPU)
    n = data.num_batches("train")
    assert n == 180 // 16
    full = batches(data.train_batches(epoch=2, seed=7))
    assert len(full) == n and all(x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 for x, _ in full)
    torch.manual_seed(123)  # unrelated global RNG use must not change anything
    assert_same_batches(full, batches(data.train_batches(epoch=2, seed=7)))
    # resuming mid-epoch sees exactly the tail of an uninterrupted pass
    assert_same_batches(full[4:], batches(data.train_batches(epoch=2, seed=7, start=4)))
    assert_same_batches(full[4:6], batches(data.train_batches(epoch=2, seed=7, start=4, stop=6)))
    # a fresh instance (a resumed process) agrees too
    fresh = CIFAR10(**fx.loader_kwargs(data_root.path)).setup(CPU)
    assert_same_batches(full[3:], batches(fresh.train_batches(epoch=2, seed=7, start=3)))
    # each epoch is a permutation without repeats; other epochs / seeds shuffle differently
    seen = torch.cat([y for _, y in full])
    assert len(seen) == n * 16
    other_epoch = batches(data.train_batches(epoch=3, seed=7))
    other_seed = batches(data.train_batches(epoch=2, seed=8))
    assert not torch.equal(full[0][0], other_epoch[0][0]) and not torch.equal(full[0][0], other_seed[0][0])


def test_augmentation_keeps_the_order_and_moves_pixels(data_root: fx.DataRoot) -> None:
    # With and without augmentation the epoch order is the same (augment draws use their own generator),
    # and the crops really move pixels.
    data = MNIST(**fx.loader_kwargs(data_root.path, augment={"crop_padding": 2, "hflip": False})).setup(CPU)
    plain = MNIST(**fx.loader_kwargs(data_root.path, augment={"crop_padding": 0, "hflip": False})).setup(CPU)
    aug = batches(data.train_batches(0, seed=5))
    raw = batches(plain.train_batches(0, seed=5))
    for (xa, ya), (xr, yr) in zip(aug, raw):
        assert torch.equal(ya, yr)  # same order: augmentation draws do not touch the shuffle
    assert any(not torch.equal(xa, xr) for (xa, _), (xr, _) in zip(aug, raw))


def test_eval_batches_are_ordered_unaugmented_and_complete(data_root: fx.DataRoot) -> None:
    data = MNIST(**fx.loader_kwargs(data_root.path, eval_batch_size=7)).setup(CPU)
    out = batches(data.eval_batches("test"))
    assert [len(y) for _, y in out] == [7] * 7 + [1] and data.num_batches("test") == 8
    assert torch.equal(torch.cat([x for x, _ in out]), data.normalize(data.splits["test"][0]))
    assert len(batches(data.eval_batches("val", stop=2))) == 2


# -- augmentation ops -------------------------------------------------------------------------------------------------
def test_random_crop_is_a_translation_matching_a_manual_crop() -> None:
    x = torch.randint(0, 256, (32, 3, 10, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = 3
    out = random_crop(x, p, torch.Generator().manual_seed(11))
    assert out.shape == x.shape and out.dtype == x.dtype
    g = torch.Generator().manual_seed(11)  # the same draws, in the same order, as the op
    dy, dx = torch.randint(0, 2 * p + 1, (32,), generator=g), torch.randint(0, 2 * p + 1, (32,), generator=g)
    padded = F.pad(x, (p, p, p, p))
    for i in range(32):
        manual = padded[i, :, dy[i]:dy[i] + 10, dx[i]:dx[i] + 12]
        assert torch.equal(out[i], manual)
        # a translation by (dy - p, dx - p): the overlapping window is the original pixels unchanged
        sy, sx = int(dy[i]) - p, int(dx[i]) - p
        src = x[i, :, max(0, sy):10 + min(0, sy), max(0, sx):12 + min(0, sx)]
        dst = out[i, :, max(0, -sy):10 - max(0, sy), max(0, -sx):12 - max(0, sx)]
        assert torch.equal(src, dst)
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 5  # offsets really vary per image
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_random_hflip_flips_about_half() -> None:
    x = torch.randint(0, 256, (64, 1, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = random_hflip(x, torch.Generator().manual_seed(3))
    flip = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5
    for i in range(64):
        assert torch.equal(out[i], x[i].flip(2) if flip[i] else x[i])
    assert 16 < int(flip.sum()) < 48
    assert torch.equal(out[~flip][:, :, :, 0], x[~flip][:, :, :, 0])
    assert torch.equal(out[flip][:, :, :, 0], x[flip][:, :, :, -1])


# -- missing data -----------------------------------------------------------------------------------------------------
MISSING = [(MNIST, "MNIST/raw"), (FashionMNIST, "FashionMNIST/raw"), (CIFAR10, "cifar-10-batches-py"),
           (CIFAR100, "cifar-100-python")]


@pytest.mark.parametrize("download", [False, True], ids=["no-download", "download-offline"])
@pytest.mark.parametrize("cls,where", MISSING, ids=[c.name for c, _ in MISSING])
def test_missing_dataset_is_a_user_error_naming_where_it_looked(cls: type[ImageData], where: str, download: bool,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FashionMNIST, "extra_dirs", (str(tmp_path / "debian"),))  # hide a system copy
    root = tmp_path / "data"
    with pytest.raises(UserError) as err:
        cls(**fx.loader_kwargs(root, download=download)).setup(CPU)
    message = str(err.value)
    assert message.startswith("data.root: ") and str(root / where) in message
    if download:
        assert "download failed" in message  # torchvision's network error, as one line
    else:
        assert "not found" in message and "data.download=true" in message
    if cls is FashionMNIST:
        assert str(tmp_path / "debian") in message
