"""Sharded checkpoints (`trainer.checkpoint.sharded=true`): an FSDP run saves its weights and optimizer state
without gathering them, each process writing its own shards with torch.distributed.checkpoint (DCP).

A sharded checkpoint is two things in `checkpoints/`:
- `shards/<name>/`: a DCP folder holding every tensor of the model and the optimizers (`.metadata` + one file per
  process), written by all ranks;
- the usual `last.pt` / `best.pt` / ...: written by rank 0 as today, atomically, with everything else the run
  needs to continue (config, schedules, scaler, counters, trackers, RNG, data state, the optimizers' non-tensor
  settings) and `SHARDS` naming its folder. No weights in it.

Every save goes to `shards/.partial/`, which rank 0 renames to a fresh name once DCP has written `.metadata` (its
last file). Only then does a `.pt` name it, so a kill -9 at any moment leaves every `.pt` pointing at a complete
folder; folders no `.pt` names any more (and an unfinished `.partial`) are removed by the next save.

Reading: resume and the end-of-run test load the shards collectively into the sharded model (any number of
processes: DCP reshards); one process (`nnctl eval`, generate, sample, init_from) reads the whole model from the
folder through `checkpoint.load_checkpoint`; `nnctl export format=checkpoint` writes it as one file.

Only tensors go through DCP: its reader unpickles non-tensor entries without weights_only, and its `.metadata` is a
pickle, read here by an unpickler that builds only DCP's own metadata records, and refused when it declares anything
but tensors (a crafted folder cannot run code).
"""
from __future__ import annotations

import contextlib
import functools
import os
import pickle
import shutil
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from nnctl import checkpoint as ck
from nnctl.errors import UserError

if TYPE_CHECKING:
    from nnctl.distributed import Dist
    from nnctl.engine import Engine

SHARDS_DIR = "shards"     # checkpoints/shards/<name>/: one DCP folder per save
PARTIAL = ".partial"      # the save in progress; renamed to its final name when complete
METADATA = ".metadata"    # DCP's index, written last: a folder without it is incomplete
SEP = "/"                 # joins nested keys into DCP's flat keys (parameter names use dots)


# -- splitting a state into tensors (DCP) and the rest (the .pt) ----------------------------------------------------
def split(tree: Any) -> tuple[Any, Any]:
    """(tensors, rest) of a nested dict: the tensor leaves, and everything else with the same nesting. Either is
    None where a subtree has none; an empty dict stays in `rest`."""
    if isinstance(tree, torch.Tensor):
        return tree, None
    if not isinstance(tree, dict):
        return None, tree
    tensors, rest = {}, {}
    for key, value in tree.items():
        t, r = split(value)
        if t is not None:
            tensors[key] = t
        if r is not None:
            rest[key] = r
    return (tensors or None), (rest if rest or not tensors else None)


def overlay(tree: Any, rest: Any) -> Any:
    """`tree` with the non-tensor leaves of `rest` put back (split's inverse): dicts merge, `rest` wins."""
    if isinstance(tree, dict) and isinstance(rest, dict):
        return {**tree, **{k: overlay(tree.get(k), v) for k, v in rest.items()}}
    return tree if rest is None else rest


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """{"model/fc.weight": tensor, "optimizer/main/state/fc.weight/exp_avg": tensor, ...}: the same tensor objects,
    so DCP's in-place load fills the nested dict."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, name + SEP) if isinstance(value, dict) else {name: value})
    return flat


# -- writing ---------------------------------------------------------------------------------------------------------
def save(directory: Path, state: dict[str, Any], dist: "Dist", step: int) -> dict[str, Any] | None:
    """Every rank: write the tensors of state[MODEL] and state[OPTIMIZER] (this rank's shards) into a new folder
    under `directory/shards`. Rank 0 gets the checkpoint dict to write as a .pt (the state without those tensors,
    naming the folder); the others None."""
    import torch.distributed.checkpoint as dcp

    tensors, rest = split({ck.MODEL: state[ck.MODEL], ck.OPTIMIZER: state[ck.OPTIMIZER]})
    root = directory / SHARDS_DIR
    partial = root / PARTIAL
    if dist.main:
        shutil.rmtree(partial, ignore_errors=True)  # what a killed save left
        partial.mkdir(parents=True)
    dist.barrier()  # nobody writes into .partial before it is empty
    with _single_process_is_meant():
        dcp.save(flatten(tensors or {}), storage_writer=dcp.FileSystemWriter(partial), no_dist=not dist.initialized)
    if not dist.main:
        return None
    # dcp.save returns once rank 0 has written .metadata after every rank's files: the folder is complete
    name = f"step{step:09d}-{uuid.uuid4().hex[:8]}"
    os.rename(partial, root / name)
    _fsync_dir(root)
    rest = rest or {}
    return {**state, ck.MODEL: rest.get(ck.MODEL, {}), ck.OPTIMIZER: rest.get(ck.OPTIMIZER, {}),
            ck.SHARDS: f"{SHARDS_DIR}/{name}"}


def collect(directory: Path) -> None:
    """Rank 0, after writing a save's .pt files: remove shard folders that no checkpoint in `directory` names."""
    root = directory / SHARDS_DIR
    if not root.is_dir():
        return
    named = set()
    for path in directory.glob("*.pt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # unreadable: keep every folder rather than guess which one it needs
            return
        if isinstance(state, dict) and ck.SHARDS in state:
            named.add(Path(state[ck.SHARDS]).name)
    for folder in root.iterdir():
        if folder.name != PARTIAL and folder.name not in named:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """DCP warns on every save/load without a process group; one process is what nnctl means there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading ---------------------------------------------------------------------------------------------------------
def folder_of(path: Path, state: dict[str, Any], key: str) -> Path:
    """The complete shard folder a checkpoint at `path` names, or a UserError naming `key`."""
    folder = path.parent / str(state[ck.SHARDS])
    if not (folder / METADATA).is_file():
        raise UserError(f"{path} keeps its weights in {folder}, which is missing or incomplete; a sharded "
                        "checkpoint is the .pt file and its checkpoints/shards/ folder together: pass the run dir "
                        "it was written in, or a file made by nnctl export format=checkpoint", key=key)
    read_metadata(folder, key)  # refuse a crafted index before anything reads it
    return folder


def read_metadata(folder: Path, key: str = "ckpt") -> Any:
    """DCP's `.metadata` of `folder`, unpickled by `_MetadataUnpickler`; anything else is a UserError."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    path = folder / METADATA
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as exc:  # whatever a damaged or crafted pickle raises: never run, never a traceback
        raise UserError(f"{path} was refused: not checkpoint metadata written by nnctl ({exc}); use another "
                        "checkpoint", key=key) from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{path} was refused: not checkpoint metadata written by nnctl (a {type(metadata).__name__})"
                        "; use another checkpoint", key=key)
    # nnctl saves tensors only; DCP would unpickle an entry declared as bytes without weights_only
    others = [k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if others:
        raise UserError(f"{path} was refused: not checkpoint metadata written by nnctl ({others[0]!r} is not a "
                        "tensor); use another checkpoint", key=key)
    return metadata


def load_into(folder: Path, tree: dict[str, Any], partial: bool = False) -> None:
    """Fill the tensors of `tree` (nested dicts whose tensor leaves are this rank's shards, e.g. from
    get_state_dict) from `folder`, collectively when a process group is up. `partial`: keys the folder lacks keep
    their values (optimizer state of parameters that never had a gradient)."""
    import torch.distributed as td
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    tensors, _ = split(tree)
    with _single_process_is_meant():
        dcp.load(flatten(tensors or {}), storage_reader=_reader(folder),
                 planner=DefaultLoadPlanner(allow_partial_load=partial),
                 no_dist=not (td.is_available() and td.is_initialized()))


def read_model(folder: Path, rest: dict[str, Any]) -> dict[str, Any]:
    """The whole model's weights from a shard folder, in this one process (on the CPU): what `nnctl eval` loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _reader(folder)
    prefix = ck.MODEL + SEP
    target = {name: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
              for name, meta in reader.read_metadata().state_dict_metadata.items()
              if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    with _single_process_is_meant():
        dcp.load(target, storage_reader=reader, no_dist=True)
    return overlay({name[len(prefix):]: tensor for name, tensor in target.items()}, rest or None)


def load_model(engine: "Engine", state: dict[str, Any]) -> None:
    """Every rank: the evaluation weights from the checkpoint's shard folder into this rank's shards."""
    from nnctl import adapters

    dist = engine.dist
    weights = adapters.model_state(engine.net, engine.eval_net, dist.local_model_state)
    load_into(Path(state[ck.SHARDS]), {ck.MODEL: weights})
    adapters.load_model_state(engine.eval_net, overlay(weights, state[ck.MODEL] or None), dist.load_local_model_state)


def load_optimizers(engine: "Engine", state: dict[str, Any]) -> dict[str, Any]:
    """Every rank: the optimizers' state as this rank's shards (their tensors from the folder, their settings from
    the .pt), ready for Optimization.load_state_dict."""
    local = engine.optim.state_dict(local=True)[0]  # allocates each optimizer's state to load into
    load_into(Path(state[ck.SHARDS]), {ck.OPTIMIZER: local}, partial=True)
    saved = state[ck.OPTIMIZER]
    return {name: overlay(tree, saved.get(name)) for name, tree in local.items()}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing else: its own dataclasses, torch sizes, dtypes and layouts, paths."""

    PLAIN = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
             ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
             ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.PLAIN:
            return super().find_class(module, name)
        if module == "torch.distributed.checkpoint.metadata":  # the classes defined there, not what it imports
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"not an allowed global in checkpoint metadata: {module}.{name}")


@functools.cache
def _safe_reader_class() -> type:
    """DCP's FileSystemReader reading `.metadata` with `_MetadataUnpickler` (built on first use: DCP is imported
    lazily)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeReader


def _reader(folder: Path) -> Any:
    return _safe_reader_class()(folder)
