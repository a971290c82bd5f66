"""A built wheel works without the source tree: its configs ship inside the package.

The wheel is built from a copy of the repository and installed into a fresh venv that sees the dev environment's
dependencies (torch, hydra, ...) through a .pth file, but not its editable nnctl (a .pth file's directory is put on
sys.path without running the .pth hooks inside it), so everything below runs the installed copy. Offline: the build
uses the dev environment's setuptools (--no-build-isolation) and the install skips dependencies.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _site_packages(prefix: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding nnctl installed from a freshly built wheel; returns its bin dir."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("nnctl", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(base / "dist"),
                            str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (base / "dist").glob("nnctl-*.whl")

    env_dir = base / "venv"
    venv.create(env_dir, with_pip=False)
    site = _site_packages(env_dir)
    (site / "dev_dependencies.pth").write_text(str(_site_packages(Path(sys.prefix))) + "\n")
    shutil.rmtree(src)  # nothing of the source tree is left to find
    install = subprocess.run([*pip, "--python", str(env_dir / "bin" / "python"), "install", "--no-deps", "--no-index",
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    assert "deprecat" not in (build.stdout + build.stderr + install.stdout + install.stderr).lower()
    return env_dir / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NNCTL_CONFIG_DIR", "VIRTUAL_ENV")}
    env.update(NNCTL_ROOT=str(cwd), OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_trains_from_any_directory(installed: Path, tmp_path: Path) -> None:
    probe = _run(installed, tmp_path, str(installed / "python"), "-c",
                 "import nnctl, nnctl.commands as c; print(nnctl.__file__); print(c.CONFIG_DIR)")
    assert probe.returncode == 0, probe.stderr
    module, config_dir = probe.stdout.split()
    assert Path(module).is_relative_to(installed.parent), module  # the wheel's copy, not the editable source
    assert Path(config_dir) == Path(module).parent / "configs"

    run = _run(installed, tmp_path, str(installed / "nnctl"), "train", "debug=fast", "trainer.device=cpu",
               "trainer.progress=false")
    assert run.returncode == 0, run.stdout + run.stderr
    (metrics,) = (tmp_path / "outputs" / "train").glob("*/*/metrics.json")
    assert json.loads(metrics.read_text())["global_step"] == 2

    # code that reads the config files directly (did-you-mean suggestions) finds the shipped copy too
    typo = _run(installed, tmp_path, str(installed / "nnctl"), "train", "model=resnt")
    assert typo.returncode == 2
    assert "did you mean 'resnet'?" in typo.stderr and "airbench" in typo.stderr, typo.stderr
