"""AdamW with weight decay on the matrices of linear layers only (not on norms, not on the embedding)."""

from __future__ import annotations

import torch

from minipretrain.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # the tied embedding / lm_head matrix is listed once
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": params, "weight_decay": weight_decay}
              for group, weight_decay in ((decay, cfg.weight_decay), (no_decay, 0.0))
              for params in _by_tensor_kind(group) if params]
    # The fused kernel is fastest where it exists (CUDA, and CPU in recent torch); foreach otherwise.
    fused = device_type in ("cuda", "cpu")
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def _by_tensor_kind(params: list) -> tuple[list, list]:
    """Plain tensors and DTensors apart: a fused or foreach step cannot mix them in one group, and tensor
    parallelism leaves some matrices replicated (e.g. an MoE router) beside the split ones."""
    from torch.distributed.tensor import DTensor

    return [p for p in params if not isinstance(p, DTensor)], [p for p in params if isinstance(p, DTensor)]
