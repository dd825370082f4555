"""Where each process stands: the devices, the process group torchrun set up, and the device mesh.

Ranks form a 3-D mesh ("pp", "dp", "tp"), innermost last: each row of `tensor_parallel` ranks splits every layer
and sees the same data; `pipeline_parallel` such groups hold successive stages of the model and see the same data
too; the rest are data parallel (DDP replicas or FSDP shards) and read disjoint parts of each global batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minipretrain.config import ParallelConfig, check_device_name
from minipretrain.errors import ConfigError


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """`train.device` (or the option `key`): auto picks CUDA, then MPS, then the CPU."""
    check_device_name(name, key)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name}: CUDA is not available on this machine (use auto or cpu)")
    index = name.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name}: this machine has {torch.cuda.device_count()} CUDA devices (0 to "
                          f"{torch.cuda.device_count() - 1})")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{key}=mps: MPS is not available on this machine (use auto or cpu)")
    return torch.device(name)


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among all, its data-parallel and pipeline ranks, and its device."""
    rank: int = 0
    size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None  # a DeviceMesh with dims ("pp", "dp", "tp") when distributed
    host_group: object = None  # a gloo group for host values on GPUs (None: the default group, gloo on CPUs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is joined: several processes, or one that shards (FSDP with CPU offload)."""
        return self.size > 1 or self.mesh is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def is_last_stage(self) -> bool:
        """True on the ranks that hold the last pipeline stage (every rank without pipeline parallelism): they
        compute the logits and the loss."""
        return self.pp_rank == self.pp_size - 1

    def sum_over_dp_(self, t: torch.Tensor) -> torch.Tensor:
        """In place, on the device (no host synchronisation): `t` summed over the data-parallel ranks."""
        if self.dp_size > 1:
            dist.all_reduce(t, group=self.mesh.get_group("dp"))
        return t

    def from_last_stage_(self, t: torch.Tensor) -> torch.Tensor:
        """In place, on the device: the last pipeline stage's `t` on every stage (what only it computes, such as
        the loss). Without pipeline parallelism, `t` itself."""
        if self.pp_size > 1:
            if not self.is_last_stage:
                t.zero_()
            dist.all_reduce(t, group=self.mesh.get_group("pp"))
        return t

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """Element-wise: is each flag set on any rank? One small all-reduce of host values, so that every rank acts
        alike on what only some saw, such as a signal; on GPUs it goes over gloo and never waits for the device."""
        if not self.distributed:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.float32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return [bool(v) for v in t.tolist()]

    def max_over_ranks_(self, t: torch.Tensor) -> torch.Tensor:
        """In place, on the device (never read back to the host): `t`'s maximum over every rank."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.mesh is not None and dist.is_initialized():  # only the group init_distributed joined
            # Everyone arrives first: a rank that tears its connections down while a peer still works (rank 0
            # drawing plots.png after the last save) can make the peer's gloo threads abort at exit.
            if self.size > 1:
                dist.barrier()
            dist.destroy_process_group()


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_group_backend(cfg: ParallelConfig, device: torch.device) -> str:
    """nccl on CUDA, gloo on CPU. With CPU offload, gradients (and so the gradient norm's all-reduce) live on the
    CPU, which nccl cannot reduce: CUDA tensors then go over nccl and CPU tensors over gloo."""
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if cfg.cpu_offload and device.type == "cuda" and backend == "nccl":
        return "cuda:nccl,cpu:gloo"
    return backend


def init_distributed(cfg: ParallelConfig, device_name: str) -> World:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU) and build the ("pp", "dp", "tp") mesh;
    without torchrun, a one-process World on the configured device (with a one-process group when FSDP offloads
    to the CPU: that is how a model too big for one GPU trains on it)."""
    size = launched_world_size()
    model_parallel = cfg.tensor_parallel * cfg.pipeline_parallel  # ranks that share one copy of the data
    if size == 1:
        for key, n in (("tensor_parallel", cfg.tensor_parallel), ("pipeline_parallel", cfg.pipeline_parallel)):
            if n > 1:
                raise ConfigError(f"parallel.{key}={n} needs that many processes: launch with torchrun "
                                  f"--nproc_per_node {n}")
        device = resolve_device(device_name)
        if not cfg.cpu_offload:
            return World(device=device)
        return _join(cfg, device, rank=0, size=1, store=dist.HashStore())  # an in-process store: no rendezvous
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if size % model_parallel:
        split = " x ".join(f"parallel.{key}={n}" for key, n in (("tensor_parallel", cfg.tensor_parallel),
                                                                ("pipeline_parallel", cfg.pipeline_parallel)) if n > 1)
        raise ConfigError(f"{split} does not divide the {size} processes")
    dp_size = size // model_parallel
    if cfg.mode == "ddp" and cfg.tensor_parallel > 1 and dp_size > 1:
        raise ConfigError("parallel.mode=ddp cannot combine with tensor parallelism across data-parallel groups: "
                          "use parallel.mode=fsdp for a 2-D (FSDP x TP) mesh, or tensor_parallel = all processes")
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
    return _join(cfg, device, rank, size)


def _join(cfg: ParallelConfig, device: torch.device, rank: int, size: int, store=None) -> World:
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"train.device={device.type}: distributed training runs on CUDA or CPU")
    if cfg.cpu_offload and device.type != "cuda":
        raise ConfigError("parallel.cpu_offload offloads GPU memory to the CPU: it needs train.device=cuda")
    if device.type == "cuda":
        if device.index is None:  # set_device and the process group want an indexed device
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dist.init_process_group(process_group_backend(cfg, device), store=store, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=cfg.timeout_s),
                            device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    pp, tp = cfg.pipeline_parallel, cfg.tensor_parallel
    dp = size // (pp * tp)
    mesh = init_device_mesh(device.type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    host_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return World(rank, size, mesh["dp"].get_local_rank(), dp, tp, mesh["pp"].get_local_rank(), pp, device, mesh,
                 host_group)
