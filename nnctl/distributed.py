"""Training on several processes with torch.distributed, inside each process: detecting how the processes were
started, the process group, sharding data, wrapping the model (DDP or FSDP2), the reductions that keep every rank's
decisions equal, and writing from rank 0 only. Starting the processes is nnctl.launch.

A single process: `current()` is a world of one, and every hook here is a no-op.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import TYPE_CHECKING, Any, Iterator

from nnctl.errors import UserError

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from nnctl.metrics import Averages

log = logging.getLogger(__name__)
STRATEGIES = ("ddp", "fsdp")
_NO_CONTEXT = contextlib.nullcontext()  # reusable: entered by every step that needs no context
BACKENDS = ("auto", "gloo", "nccl")


# -- how this process was started ---------------------------------------------------------------------------------
def detect() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when an outside launcher started this process as one of several:
    torchrun / elastic / submitit (RANK, WORLD_SIZE, LOCAL_RANK) or srun (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID, with MASTER_ADDR / MASTER_PORT). None for a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        if "MASTER_ADDR" not in env:
            raise UserError("srun started several tasks but MASTER_ADDR is not set; export MASTER_ADDR (the first "
                            "node's host name) and MASTER_PORT before srun, as examples/slurm/train.sbatch does",
                            key="MASTER_ADDR")
        # env:// rendezvous reads these
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        env.setdefault("MASTER_PORT", "29500")
    else:
        return None
    return (rank, world, local) if world > 1 else None


class Dist:
    """This process's place in the job. With world == 1 every method does nothing (or the identity)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.store: Any = None  # the rendezvous store (external launch), kept for init_process_group
        self.strategy = "ddp"
        self.published = False  # rank 0 of an external launch has told the others its run dir
        self._pending: tuple[Any, Any] | None = None  # (work, tensor) of the signal vote in flight
        self.in_turn: Any = None  # the model whose gradients average_gradients all-reduces (see wrap)

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files, logs and prints."""
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        if self.world == 1:  # the step loop asks several times per step: answer without the import
            return False
        import torch.distributed as td

        return td.is_initialized()

    # -- setup ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: Any, device: "torch.device") -> "torch.device":
        """Join the process group (idempotent); returns this rank's device (cuda:LOCAL_RANK on GPUs)."""
        import torch
        import torch.distributed as td

        if self.world == 1:
            return device
        self.strategy = trainer.strategy
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not td.is_initialized():
            backend = trainer.dist_backend
            if backend == "auto":  # CPU tensors (objects, votes) over gloo either way
                backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            timeout = datetime.timedelta(seconds=trainer.dist_timeout)
            store = self.store or self.rendezvous(timeout)
            td.init_process_group(backend, store=store, rank=self.rank, world_size=self.world, timeout=timeout)
        return device

    def rendezvous(self, timeout: datetime.timedelta | None = None) -> Any:
        """Meet the other ranks (env://) and keep the job's key-value store, which the process group then reuses.
        `timeout` defaults to NNCTL_DIST_TIMEOUT seconds (600): the wait before any config has been read."""
        import torch.distributed as td

        if timeout is None:
            timeout = datetime.timedelta(seconds=float(os.environ.get("NNCTL_DIST_TIMEOUT", 600)))
        store, _, _ = next(td.rendezvous("env://", self.rank, self.world, timeout=timeout))
        self.store = store
        return store

    def teardown(self) -> None:
        import torch.distributed as td

        if self.world > 1 and td.is_initialized():
            td.destroy_process_group()

    # -- data and model ---------------------------------------------------------------------------------------------
    def build_data(self, cfg_data: Any) -> Any:
        """The data module, built for the global batch (batch_size per process x processes) and sharded so this
        rank yields its part of every batch: natively (`shard(rank, world)`) or by slicing (`Sharded`)."""
        from hydra.utils import instantiate

        if self.world == 1:
            return instantiate(cfg_data)
        data = instantiate(cfg_data, batch_size=int(cfg_data.batch_size) * self.world)
        if self.main:
            from nnctl.reporting import console

            line = (f"{self.world} processes x data.batch_size {cfg_data.batch_size} = global batch {data.batch_size} "
                    f"({self.strategy})")
            log.info(line)
            console.print(line)
        return data.shard(self.rank, self.world) if hasattr(data, "shard") else Sharded(data, self.rank, self.world)

    def wrap(self, net: "nn.Module", device: "torch.device", in_turn: bool = False,
             sync_batchnorm: bool = False) -> "nn.Module":
        """The module that runs training forward passes: DDP around `net`, or `net` itself sharded in place by
        FSDP2 (each of its `blocks`, then the root). `net` keeps its parameter names either way.

        `in_turn`: the objective updates parts of the model in turn, calling them directly (a GAN), which DDP's
        gradient hooks never see; `net` then stays as it is, starts from rank 0's weights as under DDP, and
        `average_gradients` all-reduces before each update. `sync_batchnorm`: batch norm layers normalize with the
        statistics of the global batch (torch's SyncBatchNorm, GPUs only)."""
        if self.world == 1:
            return net
        import torch.nn as nn

        if sync_batchnorm:  # in place: the layers are children of `net`
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for holder in [m for m in net.modules() if isinstance(getattr(m, "blocks", None),
                                                                  (nn.ModuleList, nn.Sequential))]:
                for block in holder.blocks:
                    fully_shard(block)
            fully_shard(net)
            return net
        if in_turn:
            self.in_turn = net
            self._broadcast(list(net.state_dict().values()))  # what DDP's constructor does
            return net
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def average_gradients(self, params: list["torch.Tensor"]) -> None:
        """Objectives that update in turn (see `wrap`): the gradients of the parameters about to be updated,
        averaged over ranks, and the buffers (batch norm statistics) made rank 0's, as DDP's backward and forward
        do. Nothing otherwise."""
        if self.in_turn is None or not self.initialized:
            return
        import torch.distributed as td
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in params if p.grad is not None]  # the same parameters on every rank
        if grads:
            flat = _flatten_dense_tensors(grads)
            td.all_reduce(flat)
            flat /= self.world
            for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(averaged)
        self._broadcast(list(self.in_turn.buffers()))

    def _broadcast(self, tensors: list["torch.Tensor"]) -> None:
        """Rank 0's values of `tensors` on every rank (one flat broadcast per dtype)."""
        import torch.distributed as td
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_dtype: dict[Any, list[Any]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            flat = _flatten_dense_tensors(group)
            td.broadcast(flat, 0)
            for tensor, value in zip(group, _unflatten_dense_tensors(flat, group)):
                tensor.copy_(value)

    def no_sync(self, model: "nn.Module") -> Any:
        """Around a micro-batch that does not step (gradient accumulation): DDP keeps its gradients local and
        all-reduces once, with the stepping micro-batch."""
        return model.no_sync() if hasattr(model, "no_sync") else _NO_CONTEXT

    # -- state: full single-file checkpoints under either strategy, or each rank's shards ---------------------------
    @property
    def _sharded(self) -> bool:
        return self.world > 1 and self.strategy == "fsdp"

    def model_state(self, net: "nn.Module") -> dict[str, Any]:
        """Full weights (gathered on rank 0, on the CPU, under FSDP): what `nnctl eval` loads in one process."""
        if not self._sharded:
            return net.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(_resharded(net), options=_full_options())

    def local_model_state(self, net: "nn.Module") -> dict[str, Any]:
        """This rank's shards of the weights (DTensors under FSDP, the whole model otherwise), gathering nothing:
        what a sharded checkpoint saves."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(_resharded(net))

    def load_model_state(self, net: "nn.Module", weights: dict[str, Any]) -> None:
        if not self._sharded:
            net.load_state_dict(weights)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(net, weights, options=StateDictOptions(full_state_dict=True))

    def load_local_model_state(self, net: "nn.Module", weights: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(net, weights)

    def optimizer_state(self, net: "nn.Module", optimizer: "torch.optim.Optimizer",
                        local: bool = False) -> dict[str, Any]:
        """The optimizer's state: whole (gathered under FSDP), or with `local` this rank's shards, keyed by
        parameter name (torch.distributed.checkpoint's layout, which any number of processes can load)."""
        if not (self._sharded or local):
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(_resharded(net), optimizer, options=None if local else _full_options())

    def load_optimizer_state(self, net: "nn.Module", optimizer: "torch.optim.Optimizer", state: dict[str, Any],
                             local: bool = False) -> None:
        if not (self._sharded or local):
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(net, optimizer, state, options=None if local else
                                 StateDictOptions(full_state_dict=True))

    # -- agreement between ranks --------------------------------------------------------------------------------------
    def reduce(self, sums: "Averages") -> "Averages":
        """The sums of every rank added up (one all_reduce), so metrics cover all shards and are equal on every
        rank. `sums` is left as it is."""
        from nnctl.metrics import Averages

        if not self.initialized:
            return sums
        import torch
        import torch.distributed as td

        names = sorted(sums.sums)  # every rank runs the same objective: the same names
        if not names:
            return Averages()
        device = next((v.device for v in sums.sums.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        dtype = torch.float32 if device.type == "mps" else torch.float64  # exact sample counts
        flat = torch.stack([torch.as_tensor(sums.sums[k], dtype=dtype, device=device) for k in names])
        td.all_reduce(flat)
        return Averages({k: (int(v) if k == "_n" else v.float()) for k, v in zip(names, flat)})

    def mean_loss(self, loss: "torch.Tensor") -> float:
        """The loss averaged over ranks, on the host: non-finite when it is on any rank (the NaN guard)."""
        if not self.initialized:
            return loss.item()
        import torch.distributed as td

        total = loss.detach().float().clone()
        td.all_reduce(total)
        return total.item() / self.world

    def mean_losses(self, losses: "torch.Tensor") -> list[float]:
        """Several losses [k] averaged over ranks, on the host in one transfer (the deferred NaN guard)."""
        if not self.initialized:
            return losses.tolist()
        import torch.distributed as td

        total = losses.detach().float().clone()
        td.all_reduce(total)
        return (total / self.world).tolist()

    def vote_stop(self, received: int | None, now: bool = False) -> int | None:
        """The signal every rank acts on (SIGTERM/SIGINT received by any rank), decided the same on all ranks.

        Between steps the vote runs asynchronously and is read one step later, so it never stalls training;
        `now` (the end of an epoch) waits for it."""
        if self.world == 1 or not self.initialized:  # (the first test spares a call: this runs every step)
            return received
        import torch
        import torch.distributed as td

        decided = None
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            decided = int(flag.item()) or None
            self._pending = None
        if decided is None:
            flag = torch.tensor([received or 0], dtype=torch.int64)  # a CPU tensor: gloo, no device sync
            work = td.all_reduce(flag, op=td.ReduceOp.MAX, async_op=True)
            if now:
                work.wait()
                decided = int(flag.item()) or None
            else:
                self._pending = (work, flag)
        return decided

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as td

            td.barrier()


def _resharded(net: "nn.Module") -> "nn.Module":
    """`net` with every FSDP module holding its shards again: a forward without backward (evaluation) leaves the
    root's parameters gathered, and state dicts must see the sharded parameters the optimizer updates."""
    from torch.distributed.fsdp import FSDPModule

    for module in net.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return net


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


_CURRENT = Dist()


def current() -> Dist:
    """This process's Dist: set by `join` (external launch) or `worker_start`, else a world of one."""
    return _CURRENT


def join(rank: int, world: int, local_rank: int) -> Dist:
    """Become rank `rank` of `world`: only rank 0 prints (rich console) and logs below errors."""
    global _CURRENT
    _CURRENT = Dist(rank, world, local_rank)
    if rank != 0:
        from nnctl.reporting import console

        console.quiet = True
        logging.getLogger().setLevel(logging.ERROR)
    return _CURRENT


# -- a data module without native sharding ------------------------------------------------------------------------
def _slice(batch: Any, part: int, parts: int) -> Any:
    """This rank's part of a batch: a tensor, tuple/list or dict of them, split along dim 0 in near-equal parts."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.tensor_split(parts)[part]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(b, part, parts) for b in batch)
    if isinstance(batch, dict):
        return {k: _slice(v, part, parts) for k, v in batch.items()}
    return batch


class Sharded:
    """Any data module (built for the global batch), yielding rank `rank`'s slice of each batch. Every rank
    builds the same global batch, so the batches across ranks are exactly one process's; modules that can gather
    only their own samples implement `shard(rank, world)` instead."""

    def __init__(self, data: Any, rank: int, world: int) -> None:
        self.__dict__.update(_data=data, _rank=rank, _world=world)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)

    def __setattr__(self, name: str, value: Any) -> None:  # e.g. the engine's memory_format
        setattr(self._data, name, value)

    def setup(self, device: "torch.device") -> "Sharded":
        self._data.setup(device)
        return self

    def train_batches(self, epoch: int, seed: int, start: int = 0, stop: int | None = None) -> Iterator[Any]:
        for batch in self._data.train_batches(epoch, seed, start, stop):
            yield _slice(batch, self._rank, self._world)

    def eval_batches(self, split: str, stop: int | None = None) -> Iterator[Any]:
        for batch in self._data.eval_batches(split, stop):
            yield _slice(batch, self._rank, self._world)


class Silent:
    """Stands in for the run's logger on ranks > 0: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
