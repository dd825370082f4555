"""Data parallelism: DDP replicas or FSDP2 shards over the "dp" mesh dimension, and the gradient-accumulation
context that goes with each."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from minipretrain.config import ParallelConfig


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


def apply_fsdp(module: torch.nn.Module, blocks, dp_mesh, options: dict) -> None:
    """Shard each block, then the rest of `module` (embedding, final norm, tied head), over dp_mesh: one
    all-gather per block, overlapped with the previous block's compute."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=dp_mesh, **options)
    fully_shard(module, mesh=dp_mesh, **options)


def wrap_ddp(module: torch.nn.Module, device: torch.device, group=None) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   process_group=group)


def gradient_sync(step_model: torch.nn.Module, last_micro_step: bool):
    """DDP: skip the gradient all-reduce on every micro-step but the last (they accumulate locally). FSDP
    reduce-scatters every micro-step so that gradients stay sharded (ZeRO-3 memory)."""
    if hasattr(step_model, "no_sync") and not last_micro_step:
        return step_model.no_sync()
    return nullcontext()
