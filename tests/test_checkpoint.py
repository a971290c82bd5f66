"""The checkpoint format: round trip, atomic writes, safe loading (weights_only), path resolution, and no
code-running config resolvers."""
from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nnctl import checkpoint as ck
from nnctl.errors import UserError

CONFIG_YAML = "model:\n  hidden_sizes:\n  - 16\noptimizer:\n  lr: 0.001\ntrainer:\n  max_epochs: 3\n"


def _state() -> dict:
    """A checkpoint dict with every key the engine writes, from a real (tiny) model and optimizer step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return {
        ck.CONFIG: CONFIG_YAML,
        ck.MODEL: model.state_dict(),
        ck.OPTIMIZER: optimizer.state_dict(),
        ck.SCHEDULER: scheduler.state_dict(),
        ck.SCALER: torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        ck.EPOCH: 2, ck.STEP: 17, ck.BATCH_IN_EPOCH: 5,
        ck.TRACKERS: {"best": {"best": 0.75, "bad_checks": 0}, "early_stopping": {"best": -0.5, "bad_checks": 1}},
        ck.METRICS: {"val/acc": 0.75, "val/loss": 0.5},
        ck.RNG: ck.rng_state(),
        ck.EXTRA: {"ema": {"0.weight": torch.ones(3, 4)}},
    }


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


# -- round trip --------------------------------------------------------------------------------------------------------
def test_round_trip_keeps_every_key_and_the_config(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "run" / "checkpoints" / ck.LAST  # parent dirs are created
    ck.save_checkpoint(state, path)
    loaded = ck.load_checkpoint(path)
    assert loaded[ck.FORMAT] == ck.FORMAT_VERSION
    assert set(loaded) == set(state) | {ck.FORMAT}
    for key in state:
        assert _equal(state[key], loaded[key]), key
    assert OmegaConf.to_container(OmegaConf.create(loaded[ck.CONFIG])) == {
        "model": {"hidden_sizes": [16]}, "optimizer": {"lr": 0.001}, "trainer": {"max_epochs": 3}}
    # the weights and optimizer state load into fresh objects
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.load_state_dict(loaded[ck.MODEL])
    torch.optim.AdamW(model.parameters(), lr=1e-3).load_state_dict(loaded[ck.OPTIMIZER])


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ck.save_checkpoint({ck.CONFIG: CONFIG_YAML, ck.MODEL: {}, ck.RNG: ck.rng_state()}, tmp_path / ck.LAST)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ck.set_rng_state(ck.load_checkpoint(tmp_path / ck.LAST)[ck.RNG])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# -- atomic writes -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupted"])
def test_a_crash_mid_write_keeps_the_previous_file_and_leaves_no_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException) -> None:
    path = tmp_path / "checkpoints" / ck.LAST
    ck.save_checkpoint({ck.CONFIG: CONFIG_YAML, ck.MODEL: {"w": torch.zeros(1000)}}, path)
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj: object, f: io.BufferedWriter, *args: object, **kwargs: object) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half of the new file reaches the disk
        f.flush()
        raise failure

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(type(failure)):
        ck.save_checkpoint({ck.CONFIG: CONFIG_YAML, ck.MODEL: {"w": torch.ones(1000)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [ck.LAST], "a temp file was left behind"
    monkeypatch.undo()
    assert torch.equal(ck.load_checkpoint(path)[ck.MODEL]["w"], torch.zeros(1000))


def test_save_replaces_the_file_in_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new file only appears through os.replace of a complete temp file in the same directory."""
    path = tmp_path / ck.BEST
    calls: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        assert Path(src).parent == path.parent and Path(src).stat().st_size > 0
        calls.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    ck.save_checkpoint({ck.CONFIG: CONFIG_YAML, ck.MODEL: {}}, path)
    assert len(calls) == 1 and Path(calls[0][1]) == path


# -- safe loading ------------------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this object runs a shell command, as a malicious checkpoint would."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _Evals:
    def __reduce__(self) -> tuple:
        return (eval, ("__import__('pathlib').Path('pwned-eval').touch()",))


def _write_malicious(kind: str, path: Path, marker: Path) -> None:
    payload = {ck.FORMAT: ck.FORMAT_VERSION, ck.CONFIG: CONFIG_YAML, ck.MODEL: _RunsCode(f"touch {marker}")}
    if kind == "torch-zip":
        torch.save(payload, path)
    elif kind == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif kind == "pickle-protocol-2":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    elif kind == "pickle-protocol-4":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    elif kind == "builtins-eval":
        torch.save({ck.FORMAT: ck.FORMAT_VERSION, ck.CONFIG: CONFIG_YAML, ck.MODEL: _Evals()}, path)


@pytest.mark.parametrize("kind", ["torch-zip", "torch-legacy", "pickle-protocol-2", "pickle-protocol-4",
                                  "builtins-eval"])
def test_a_malicious_pickle_is_refused_and_never_runs(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    _write_malicious(kind, path, marker)
    with pytest.raises(UserError) as info:
        ck.load_checkpoint(path)
    message = str(info.value)
    assert message.startswith("ckpt: ") and "\n" not in message
    assert "refused for safety" in message and "could run code" in message and str(path) in message
    assert not marker.exists() and not (tmp_path / "pwned-eval").exists(), "the pickle ran code"


def test_load_uses_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck.save_checkpoint({ck.CONFIG: CONFIG_YAML, ck.MODEL: {}}, tmp_path / ck.LAST)
    seen: dict = {}
    real_load = torch.load

    def load(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    ck.load_checkpoint(tmp_path / ck.LAST)
    assert seen.get("weights_only") is True


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"just some text\n", "is not a readable checkpoint"),
    (bytes(range(256)) * 8, "is not a readable checkpoint"),
], ids=["empty", "text", "binary"])
def test_unreadable_files_are_user_errors(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        ck.load_checkpoint(path, key="resume")
    with pytest.raises(UserError, match=r"^resume: "):
        ck.load_checkpoint(path, key="resume")


def test_truncated_and_foreign_checkpoints_are_user_errors(tmp_path: Path) -> None:
    good = tmp_path / ck.LAST
    ck.save_checkpoint(_state(), good)
    data = good.read_bytes()
    for n in (len(data) // 2, len(data) - 10, 100):
        cut = tmp_path / f"cut{n}.pt"
        cut.write_bytes(data[:n])
        with pytest.raises(UserError, match="is not a readable checkpoint"):
            ck.load_checkpoint(cut)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="is not an nnctl checkpoint"):
        ck.load_checkpoint(tmp_path / "foreign.pt")
    torch.save({ck.FORMAT: 99, ck.CONFIG: CONFIG_YAML, ck.MODEL: {}}, tmp_path / "future.pt")
    with pytest.raises(UserError, match="format 99"):
        ck.load_checkpoint(tmp_path / "future.pt")
    torch.save({ck.FORMAT: ck.FORMAT_VERSION, ck.MODEL: {}}, tmp_path / "noconfig.pt")
    with pytest.raises(UserError, match="incomplete nnctl checkpoint .*config_yaml"):
        ck.load_checkpoint(tmp_path / "noconfig.pt")
    torch.save({ck.FORMAT: ck.FORMAT_VERSION, ck.CONFIG: "a: [1,\n", ck.MODEL: {}}, tmp_path / "badyaml.pt")
    with pytest.raises(UserError, match="unreadable config"):
        ck.load_checkpoint(tmp_path / "badyaml.pt")


# -- resolving a checkpoint path ---------------------------------------------------------------------------------------
@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "outputs" / "train" / "2024-01-01" / "12-00-00"
    for name in (ck.BEST, ck.LAST):
        ck.save_checkpoint({ck.CONFIG: CONFIG_YAML, ck.MODEL: {}}, run / "checkpoints" / name)
    return run


def test_resolve_run_dir_checkpoints_dir_and_file(run_dir: Path) -> None:
    checkpoints = run_dir / "checkpoints"
    assert ck.resolve_checkpoint(run_dir) == checkpoints / ck.BEST
    assert ck.resolve_checkpoint(run_dir, prefer=ck.LAST) == checkpoints / ck.LAST
    assert ck.resolve_checkpoint(checkpoints) == checkpoints / ck.BEST
    assert ck.resolve_checkpoint(str(checkpoints / ck.LAST)) == checkpoints / ck.LAST
    (checkpoints / ck.BEST).unlink()
    assert ck.resolve_checkpoint(run_dir) == checkpoints / ck.LAST  # falls back to the other one


def test_resolve_expands_home(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(run_dir.parent))
    assert ck.resolve_checkpoint(f"~/{run_dir.name}") == run_dir / "checkpoints" / ck.BEST


@pytest.mark.parametrize("key", ["ckpt", "resume"])
def test_resolve_missing_paths_name_the_argument(tmp_path: Path, key: str) -> None:
    with pytest.raises(UserError, match=rf"^{key}: .*nope\.pt does not exist; pass a checkpoint file"):
        ck.resolve_checkpoint(tmp_path / "nope.pt", key=key)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=rf"^{key}: .*empty holds no checkpoint \(looked for best\.pt and last\.pt"):
        ck.resolve_checkpoint(tmp_path / "empty", key=key)
    with pytest.raises(UserError, match=rf"^{key}: no checkpoint given"):
        ck.resolve_checkpoint("", key=key)


# -- config resolvers --------------------------------------------------------------------------------------------------
OMEGACONF_BUILTINS = {"oc.create", "oc.decode", "oc.deprecated", "oc.dict.keys", "oc.dict.values", "oc.env",
                      "oc.select"}
HYDRA_RESOLVERS = {"hydra", "now", "python_version"}


def _resolvers() -> set[str]:
    from omegaconf.basecontainer import BaseContainer

    return set(BaseContainer._resolvers)


def test_only_builtin_resolvers_are_registered_after_a_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import nnctl.commands  # noqa: F401  (importing must not register resolvers either)
    from nnctl.cli import main

    assert main(["train", "optimizer.lr=-1"]) == 2  # runs a whole Hydra job (then fails validation)
    marker = tmp_path / "pwned"
    code = main(["train", f"trainer.max_epochs=${{eval:__import__('os').system('touch {marker}')}}"])
    assert code == 2 and not marker.exists()
    assert main(["train", "trainer.max_epochs=${eval:1+1}"]) == 2
    for name in ("eval", "exec", "python", "py", "sh", "shell", "import", "lambda"):
        assert not OmegaConf.has_resolver(name), name
    assert _resolvers() <= OMEGACONF_BUILTINS | HYDRA_RESOLVERS, _resolvers() - OMEGACONF_BUILTINS - HYDRA_RESOLVERS
