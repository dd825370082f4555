"""The optimizer: AdamW (optim.name=adamw), or Muon for the blocks' matrices and AdamW for the rest (muon).

    optimizer = build_optimizer(model, cfg.optim, device.type)
    set_learning_rate(optimizer, lr_at(step, cfg.optim, max_steps), cfg.optim)   # one schedule drives both

AdamW puts weight decay on the matrices of linear layers only (not on norms, not on the embedding). Muon
(torch.optim.Muon: momentum, then Newton-Schulz orthogonalisation of the update) trains the 2-D weights inside the
blocks: attention q/k/v/o, SwiGLU gate/up/down, and MoE experts. The embedding (and so the tied head), the norms
and the MoE router stay with AdamW, as in modded-nanogpt and Moonlight.
"""

from __future__ import annotations

import torch

from minipretrain.config import OptimConfig

MUON_FREE = ("mlp.gate.weight",)  # 2-D, but a router: it stays with AdamW


def is_muon_parameter(name: str, p: torch.Tensor) -> bool:
    """A matrix inside a transformer block (not the MoE router): what optim.name=muon trains with Muon."""
    return p.dim() == 2 and name.startswith("layers.") and not name.endswith(MUON_FREE)


class Optimizers:
    """Several optimizers stepped as one (Muon and AdamW). It has what the trainer uses of an optimizer: its
    param_groups, step, zero_grad; checkpoints and snapshots take `optimizers` (torch.distributed.checkpoint's
    get_state_dict accepts a list)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.defaults = {"fused": False}  # a skip is decided on the host: Muon has no found_inf

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def optimizer_list(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind `optimizer`, for torch.distributed.checkpoint's state-dict functions."""
    return list(optimizer.optimizers) if isinstance(optimizer, Optimizers) else [optimizer]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str):
    named = list(model.named_parameters())  # the tied embedding / lm_head matrix is listed once
    muon = [p for name, p in named if cfg.name == "muon" and is_muon_parameter(name, p)]
    chosen = {id(p) for p in muon}
    decay, no_decay = [], []
    for name, p in named:
        if id(p) not in chosen:
            (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    adamw = _adamw([{"params": params, "weight_decay": weight_decay}
                    for group, weight_decay in ((decay, cfg.weight_decay), (no_decay, 0.0))
                    for params in _by_tensor_kind(group) if params], cfg, device_type)
    if cfg.name == "adamw":
        return adamw
    muon_optimizer = torch.optim.Muon(muon, lr=cfg.muon_lr or cfg.lr, momentum=cfg.muon_momentum,
                                      weight_decay=_muon_weight_decay(cfg), adjust_lr_fn=cfg.muon_adjust_lr)
    return Optimizers([muon_optimizer, adamw])


def _adamw(groups: list[dict], cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    # The fused kernel is fastest where it exists (CUDA, and CPU in recent torch); foreach otherwise.
    fused = device_type in ("cuda", "cpu")
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def _muon_weight_decay(cfg: OptimConfig) -> float:
    return cfg.weight_decay if cfg.muon_weight_decay is None else cfg.muon_weight_decay


def set_learning_rate(optimizer, lr: float, cfg: OptimConfig) -> None:
    """Set the step's learning rate: `lr` for AdamW; for Muon the same schedule scaled to optim.muon_lr (the
    schedule's shape, warmup and decay apply to both)."""
    for each in optimizer_list(optimizer):
        scale = (cfg.muon_lr or cfg.lr) / cfg.lr if isinstance(each, torch.optim.Muon) else 1.0
        for group in each.param_groups:
            group["lr"] = lr * scale


def _by_tensor_kind(params: list) -> tuple[list, list]:
    """Plain tensors and DTensors apart: a fused or foreach step cannot mix them in one group, and tensor
    parallelism leaves some matrices replicated (e.g. an MoE router) beside the split ones."""
    from torch.distributed.tensor import DTensor

    return [p for p in params if not isinstance(p, DTensor)], [p for p in params if isinstance(p, DTensor)]
