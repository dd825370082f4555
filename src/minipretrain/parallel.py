"""Scale-out on torch.distributed: the process group, the device mesh, and DDP / FSDP2 / tensor-parallel wrapping
of a plain MiniMind. The model file never imports this one (torchtitan's `parallelize.py` split).

    world = init_distributed(cfg.parallel, cfg.train.device)   # one process, or the ranks torchrun started
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)   # before any wrapping
    step_model = parallelize(model, world, cfg.parallel, amp_dtype)
    with gradient_sync(step_model, last_micro_step): ...      # DDP all-reduces only at the accumulation boundary

Ranks form a 2-D mesh ("dp", "tp"): each row of `tensor_parallel` ranks splits every layer and sees the same data;
the rows are data parallel (DDP replicas or FSDP shards) and read disjoint parts of each global batch.
"""

from __future__ import annotations

import datetime
import os
import types
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from minipretrain.config import ParallelConfig, check_device_name
from minipretrain.errors import ConfigError
from minipretrain.moe import moe_layers


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
    """Where this process stands: its rank among all, its data-parallel rank, and its device."""
    rank: int = 0
    size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None  # a DeviceMesh with dims ("dp", "tp") when distributed

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

    def sum_over_dp(self, values: list[float]) -> list[float]:
        """Element-wise sums over the data-parallel ranks (tensor-parallel ranks hold the same values)."""
        if self.dp_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.mesh.get_group("dp"))
        return t.tolist()

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """Element-wise: is each flag set on any rank? (One small all-reduce, so that every rank acts alike on
        what only some saw, such as a signal.)"""
        if not self.distributed:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.float32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

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
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU) and build the ("dp", "tp") mesh;
    without torchrun, a one-process World on the configured device (with a one-process group when FSDP offloads
    to the CPU: that is how a model too big for one GPU trains on it)."""
    size = launched_world_size()
    if size == 1:
        if cfg.tensor_parallel > 1:
            raise ConfigError(f"parallel.tensor_parallel={cfg.tensor_parallel} needs that many processes: launch "
                              f"with torchrun --nproc_per_node {cfg.tensor_parallel}")
        device = resolve_device(device_name)
        if not cfg.cpu_offload:
            return World(device=device)
        return _join(cfg, device, rank=0, size=1, store=dist.HashStore())  # an in-process store: no rendezvous
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if size % cfg.tensor_parallel:
        raise ConfigError(f"parallel.tensor_parallel={cfg.tensor_parallel} does not divide the {size} processes")
    dp_size = size // cfg.tensor_parallel
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

    dp_size = size // cfg.tensor_parallel
    mesh = init_device_mesh(device.type, (dp_size, cfg.tensor_parallel), mesh_dim_names=("dp", "tp"))
    return World(rank, size, mesh["dp"].get_local_rank(), dp_size, cfg.tensor_parallel, device, mesh)


# Tensor parallelism (Megatron style): q/k/v and gate/up split their outputs (whole heads, slices of the SwiGLU
# width), o and down split their inputs and sum across ranks. Embedding, norms and the tied head stay replicated.
# A mixture of experts splits every expert (routed and shared) like the dense SwiGLU; its router stays replicated,
# so every tensor-parallel rank routes the same tokens to the same experts.
_COLUMN_WISE, _ROW_WISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), ("o_proj", "down_proj")


def _tensor_parallel_plan(block: torch.nn.Module) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for name, _ in block.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in _COLUMN_WISE:
            plan[name] = ColwiseParallel()
        elif leaf in _ROW_WISE:
            plan[name] = RowwiseParallel()
    return plan


def fsdp_options(cfg: ParallelConfig, amp_dtype: torch.dtype) -> dict:
    """fully_shard keyword arguments: low-precision compute with fp32 master weights and fp32 gradient reduction
    when training in bf16, ZeRO-2-like when parameters stay gathered, optional CPU offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    options = {"reshard_after_forward": cfg.reshard_after_forward}
    if amp_dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    return options


def check_parallel_precision(world: World, cfg: ParallelConfig, amp_dtype: torch.dtype) -> None:
    if world.distributed and amp_dtype == torch.float16 and (cfg.mode == "fsdp" or world.tp_size > 1):
        raise ConfigError("train.dtype=float16 needs a gradient scaler that FSDP and tensor parallelism do not "
                          "use here: train with bfloat16 (the default on GPUs that support it)")


def checkpointed_blocks(num_layers: int, mode: str) -> list[int]:
    """Indices of the blocks whose activations `train.activation_checkpointing` recomputes: none; full: every
    block; selective: every second block, 1, 3, 5, ... (torchtitan's selective per-layer AC with frequency 2),
    which keeps about half of the blocks' activations and recomputes the other half's forward in backward."""
    return {"none": [], "full": list(range(num_layers)), "selective": list(range(1, num_layers, 2))}[mode]


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Recompute the chosen blocks (see checkpointed_blocks) in backward instead of keeping their activations,
    with torch.utils.checkpoint (non-reentrant; the RNG state is replayed, so dropout draws the same masks).

    The block's forward is replaced on the instance rather than wrapped in a module, so parameter names, and with
    them state dicts and checkpoints, are the same with or without it. Apply it before parallelize: FSDP2, DDP and
    tensor parallelism then wrap the blocks as usual."""
    for i in checkpointed_blocks(len(model.layers), mode):
        block = model.layers[i]
        block.forward = types.MethodType(_checkpointed_forward, block)  # a method: deepcopy re-binds it


def _checkpointed_forward(block: torch.nn.Module, *args, **kwargs):
    forward = type(block).forward
    if not (block.training and torch.is_grad_enabled()):  # evaluation and generation: nothing kept to recompute
        return forward(block, *args, **kwargs)
    first_call = True

    def run(*args, **kwargs):
        nonlocal first_call
        if first_call:
            first_call = False
            return forward(block, *args, **kwargs)
        # The recompute in backward: an MoE layer's forward adds to its routed-token counts and stores its
        # balancing loss; undo both, so that counts are not doubled and no recompute graph stays referenced.
        kept = [(m, m.routed_tokens, m.aux_loss) for m in moe_layers(block)]
        try:
            return forward(block, *args, **kwargs)
        finally:
            for m, routed, aux in kept:
                m.routed_tokens, m.aux_loss = routed, aux

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def parallelize(model: torch.nn.Module, world: World, cfg: ParallelConfig, amp_dtype: torch.dtype) -> torch.nn.Module:
    """Apply tensor parallelism, then FSDP2 or DDP, to `model` in place; returns the module to call for training.
    For FSDP and TP that is `model` itself (its parameters become DTensors); for DDP it is the DDP wrapper."""
    if not world.distributed:
        return model
    check_parallel_precision(world, cfg, amp_dtype)
    if world.tp_size > 1:
        from torch.distributed.tensor.parallel import parallelize_module

        for block in model.layers:
            parallelize_module(block, world.mesh["tp"], _tensor_parallel_plan(block))
    if cfg.mode == "fsdp" and (world.dp_size > 1 or cfg.cpu_offload):
        from torch.distributed.fsdp import fully_shard

        options = fsdp_options(cfg, amp_dtype)
        for block in model.layers:  # one all-gather per block, overlapped with the previous block's compute
            fully_shard(block, mesh=world.mesh["dp"], **options)
        fully_shard(model, mesh=world.mesh["dp"], **options)  # embedding, final norm, tied head
        return model
    if world.dp_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def gradient_sync(step_model: torch.nn.Module, last_micro_step: bool):
    """DDP: skip the gradient all-reduce on every micro-step but the last (they accumulate locally). FSDP
    reduce-scatters every micro-step so that gradients stay sharded (ZeRO-3 memory)."""
    if hasattr(step_model, "no_sync") and not last_micro_step:
        return step_model.no_sync()
    return nullcontext()


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip the global gradient norm (0 = no clipping); returns the norm before clipping.

    Gradients are grouped by where they live: plain tensors (replicated, counted once), and DTensors per device
    mesh (FSDP shards on "dp", FSDP x TP on both dims), each group's norm reduced over its own mesh."""
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2)
    total = torch.stack(squares).sum().sqrt().item() if squares else 0.0
    if max_norm and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for grads in groups.values():
            torch._foreach_mul_(grads, scale)
    return total
