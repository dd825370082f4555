"""Tensor parallelism (Megatron style) of MiniMind blocks: q/k/v and gate/up split their outputs (whole heads,
slices of the SwiGLU width), o and down split their inputs and sum across ranks. Embedding, norms and the tied head
stay replicated. A mixture of experts splits every expert (routed and shared) like the dense SwiGLU; its router
stays replicated, so every tensor-parallel rank routes the same tokens to the same experts."""

from __future__ import annotations

import torch

_COLUMN_WISE, _ROW_WISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), ("o_proj", "down_proj")


def tensor_parallel_plan(block: torch.nn.Module) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for name, _ in block.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in _COLUMN_WISE:
            plan[name] = ColwiseParallel()
        elif leaf in _ROW_WISE:
            plan[name] = RowwiseParallel()
    return plan


def apply_tensor_parallel(blocks, tp_mesh) -> None:
    """Split each block's projections over the "tp" mesh dimension, in place (parameters become DTensors)."""
    from torch.distributed.tensor.parallel import parallelize_module

    for block in blocks:
        parallelize_module(block, tp_mesh, tensor_parallel_plan(block))
