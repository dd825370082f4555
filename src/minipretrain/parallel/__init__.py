"""Scale-out on torch.distributed: the process group and device mesh (mesh.py), and data (data_parallel.py),
tensor (tensor_parallel.py) and pipeline (pipeline.py) parallelism applied to a plain MiniMind from outside; the
model file never imports this package (torchtitan's `parallelize.py` split).

    world = init_distributed(cfg.parallel, cfg.train.device)   # one process, or the ranks torchrun started
    apply_activation_checkpointing(model, mode); compile_blocks(model)   # block by block, before any wrapping
    module, step_model = parallelize(model, world, cfg.parallel, amp_dtype, grad_accum)
    with gradient_sync(step_model, last_micro_step): ...      # DDP all-reduces only at the accumulation boundary
"""

from __future__ import annotations

import torch

from minipretrain.config import ParallelConfig
from minipretrain.errors import ConfigError
from minipretrain.parallel.blockwise import apply_activation_checkpointing, checkpointed_blocks, compile_blocks
from minipretrain.parallel.data_parallel import apply_fsdp, fsdp_options, gradient_sync, wrap_ddp
from minipretrain.parallel.mesh import (
    World,
    init_distributed,
    launched_world_size,
    process_group_backend,
    resolve_device,
)
from minipretrain.parallel.pipeline import Pipeline
from minipretrain.parallel.tensor_parallel import apply_tensor_parallel
from minipretrain.precision import exact_dtype

__all__ = ["Pipeline", "World", "apply_activation_checkpointing", "check_parallel_precision", "checkpointed_blocks",
           "clip_grad_norm", "compile_blocks", "fsdp_options", "gradient_sync", "init_distributed",
           "launched_world_size", "parallelize", "process_group_backend", "resolve_device"]


def check_parallel_precision(world: World, cfg: ParallelConfig, amp_dtype: torch.dtype) -> None:
    if world.distributed and amp_dtype == torch.float16 and (
            cfg.mode == "fsdp" or world.tp_size > 1 or world.pp_size > 1):
        raise ConfigError("train.dtype=float16 needs a gradient scaler that FSDP, tensor and pipeline parallelism do "
                          "not use here: train with bfloat16 (the default on GPUs that support it)")


def parallelize(model: torch.nn.Module, world: World, cfg: ParallelConfig, amp_dtype: torch.dtype,
                grad_accum: int = 1) -> tuple[torch.nn.Module, object]:
    """Apply pipeline, tensor and data parallelism to `model`; returns (module, step_model).

    module: this rank's parameters under the model's names (for the optimizer, checkpoints, clipping): `model`
    itself, or its pipeline stages' share. step_model: what runs a training forward: `model` (FSDP and TP turn its
    parameters into DTensors in place), its DDP wrapper, or a Pipeline."""
    if not world.distributed:
        return model, model
    check_parallel_precision(world, cfg, amp_dtype)
    shard = cfg.mode == "fsdp" and (world.dp_size > 1 or cfg.cpu_offload)

    def wrap(module):
        blocks = module.blocks() if hasattr(module, "blocks") else list(module.layers)
        if world.tp_size > 1:
            apply_tensor_parallel(blocks, world.mesh["tp"])
        if shard:
            apply_fsdp(module, blocks, world.mesh["dp"], fsdp_options(cfg, amp_dtype))
            return module
        # Pipeline stages average their replicas' gradients themselves, after the schedule's last backward: DDP's
        # reducer rejects the pipeline's several backward passes per step (torch 2.13, a first-iteration assert).
        if world.dp_size == 1 or world.pp_size > 1:
            return module
        return wrap_ddp(module, world.device, world.mesh.get_group("dp"))

    if world.pp_size > 1:
        pipeline = Pipeline(model, world, cfg, grad_accum, wrap, average_replicas=world.dp_size > 1 and not shard)
        return pipeline.module, pipeline
    return model, wrap(model)


def clip_grad_norm(parameters, max_norm: float, world: World | None = None, not_counted=()) -> torch.Tensor:
    """Clip the global gradient norm (0 = no clipping); returns the norm before clipping, as a device tensor (no
    host synchronisation: a norm under max_norm multiplies the gradients by exactly 1).

    Gradients are grouped by where they live: plain tensors (replicated, counted once), and DTensors per device
    mesh (FSDP shards on "dp", FSDP x TP on both dims), each group's norm reduced over its own mesh. Under pipeline
    parallelism each rank holds other parameters: the squares are summed over the pipeline ranks, leaving out
    `not_counted` (the last stage's copy of the tied embedding)."""
    from torch.distributed.tensor import DTensor

    skipped = {id(p) for p in not_counted}
    groups: dict = {}
    counted: dict = {}
    for p in parameters:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
            if id(p) not in skipped:
                counted.setdefault(key, []).append(p.grad)
    squares = []
    for grads in counted.values():
        norm = torch.nn.utils.get_total_norm(grads)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2)
    device = world.device if world is not None else torch.device("cpu")
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if world is not None and world.pp_size > 1:
        import torch.distributed as dist

        dist.all_reduce(total, group=world.mesh.get_group("pp"))
    total = total.sqrt()
    if max_norm:  # the coefficient in float64, as a Python float would be: the same bits as torch's own clipping
        scale = (max_norm / (total.to(exact_dtype(total.device)) + 1e-6)).clamp(max=1.0).float()
        for grads in groups.values():
            torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], scale)
    return total
