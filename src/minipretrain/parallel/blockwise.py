"""What is applied to a MiniMind block by block, before any parallel wrapping: activation checkpointing and
torch.compile. Block by block keeps parameter names (and so checkpoints) unchanged, and gives FSDP2, DDP, tensor
and pipeline parallelism the same compiled code to wrap (torchtitan's order: AC, compile, then TP / FSDP / PP)."""

from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint

from minipretrain.moe import moe_layers


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


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile every transformer block in place (nn.Module.compile: the module stays itself, its parameter
    names do not change). One block's graph serves all of them, so compilation takes seconds where compiling the
    whole model takes minutes, and the same compiled blocks run under FSDP2, tensor and pipeline parallelism. The
    embedding, final norm and loss stay eager: they are a small share of the step."""
    for block in model.layers:
        block.compile()
