"""Shared fixtures: tiny datasets in their real on-disk formats, an isolated working dir, and a CLI runner.

Every test runs in its own tmp dir with NNCTL_ROOT pointing there, so no run writes into the repository, and name
resolution is cut off, so any attempt to download (torchvision) fails fast and the same way online and offline.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

# pytest -n 2 runs two workers on two cores: one intra-op thread each avoids oversubscription, under which tiny
# ops spend ~50x longer spinning in OpenMP barriers than computing. Subprocesses (nnctl runs spawned by tests)
# get the same setting, so their float reductions, and hence bitwise results, match in-process runs.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import fixtures` from any test module

import fixtures as fx  # noqa: E402


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> fx.DataRoot:
    """<root>/MNIST/raw (plain IDX), <root>/FashionMNIST/raw (.gz IDX), cifar-10-batches-py, cifar-100-python."""
    root = tmp_path_factory.mktemp("data")
    return fx.DataRoot(root, fx.make_mnist(root, "MNIST", gz=False, seed=0),
                       fx.make_mnist(root, "FashionMNIST", gz=True, seed=10),
                       fx.make_cifar10(root, seed=20), fx.make_cifar100(root, seed=30))


@pytest.fixture(scope="session")
def mnist_gz_root(tmp_path_factory: pytest.TempPathFactory) -> fx.GzRoot:
    """MNIST as gzipped IDX files (how torchvision's mirrors ship them)."""
    root = tmp_path_factory.mktemp("mnist_gz")
    return root, fx.make_mnist(root, "MNIST", gz=True, seed=0)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> fx.Images:
    """<root>/<class>/*.png|jpg with one corrupt .png; returns (root, number of good images)."""
    root = tmp_path_factory.mktemp("images")
    return root, fx.make_image_folder(root)


@pytest.fixture(scope="session")
def split_image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/{train,val}/<class>/*.png|jpg."""
    root = tmp_path_factory.mktemp("images_split")
    fx.make_split_image_folder(root)
    return root


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run each test in its own dir: relative paths and NNCTL_ROOT land in tmp_path, and no host resolves."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NNCTL_ROOT", str(tmp_path))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def offline(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "name resolution disabled in tests (offline)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    yield tmp_path


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., int]:
    """nnctl.cli.main in-process, with outputs under tmp_path/outputs."""
    from nnctl.cli import main

    def run(*args: str) -> int:
        return main([*args, f"paths.root_dir={tmp_path}"])

    return run
