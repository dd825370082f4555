"""Mixture-of-experts feed-forward: a softmax router sends each token to its top-k routed experts (SwiGLUs),
plus optional shared experts that see every token.

    mlp = MoEFeedForward(cfg, make_expert=lambda width: FeedForward(cfg.hidden_size, width))
    y = mlp(x)                 # (batch, seq, hidden); in training mode mlp.aux_loss holds the balancing loss
    balance = end_of_step(model, world, cfg.router_bias_update_rate)   # after optimizer.step(), in the trainer

Dispatch groups tokens by expert (one sort), runs each expert once on its tokens, and puts the weighted outputs
back in place: no Python loop over tokens. Two balancing mechanisms, usable together:
- the auxiliary loss (Switch Transformer / MiniMind): coef * E * sum_i f_i * P_i, f_i the share of routed slots
  that went to expert i and P_i its mean router probability; 1 * coef for a perfectly balanced router. With
  `seq_aux` both are taken per sequence and averaged (MiniMind2), which makes the loss a mean over sequences:
  gradient accumulation and data parallelism then give the same loss as one big batch.
- auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the router scores for top-k selection
  only (the combine weights stay the softmax), nudged after every step by `rate` toward equal load.
Parameter names follow MiniMind's MoE (mlp.gate, mlp.experts.N.*, mlp.shared_experts.N.*).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minipretrain.config import ModelConfig
from minipretrain.precision import exact_dtype


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, make_expert):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.norm_topk_prob, self.seq_aux = cfg.norm_topk_prob, cfg.seq_aux
        self.aux_loss_coef = cfg.router_aux_loss_coef
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(make_expert(cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.shared_experts = nn.ModuleList(make_expert(cfg.moe_intermediate_size)
                                            for _ in range(cfg.num_shared_experts))
        if cfg.router_bias_update_rate > 0:  # a buffer: saved with the weights, so resume continues it exactly
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        else:
            self.expert_bias = None
        self.aux_loss: torch.Tensor | None = None  # this forward's balancing loss (training mode only)
        self.routed_tokens: torch.Tensor | None = None  # slots routed to each expert since the last end_of_step

    def inactive_parameters(self) -> int:
        """Parameters a token does not use: the routed experts outside its top-k."""
        return (self.num_experts - self.top_k) * sum(p.numel() for p in self.experts[0].parameters())

    def forward(self, x):
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        scores = self.gate(flat).float().softmax(dim=-1)  # (tokens, experts), float32 for a stable softmax
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        expert_idx = choice.topk(self.top_k, dim=-1).indices  # (tokens, k)
        weights = scores.gather(-1, expert_idx)
        if self.norm_topk_prob:  # as in Hugging Face and MiniMind: with top-1 the weight becomes 1, and the router
            weights = weights / weights.sum(dim=-1, keepdim=True)  # then learns from the balancing loss alone
        y = dispatch(flat, expert_idx, weights, self.experts)
        for expert in self.shared_experts:
            y = y + expert(flat)
        if self.training:
            counts = torch.bincount(expert_idx.flatten(), minlength=self.num_experts).detach()
            self.routed_tokens = counts if self.routed_tokens is None else self.routed_tokens + counts
            self.aux_loss = (balancing_loss(scores, expert_idx, batch, self.seq_aux) * self.aux_loss_coef
                             if self.aux_loss_coef > 0 else None)
        return y.view(batch, seq, hidden)


def dispatch(x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor, experts) -> torch.Tensor:
    """x (tokens, hidden), expert_idx and weights (tokens, k) -> sum over each token's k experts of
    weight * expert(x). The (token, slot) pairs are sorted by expert so each expert runs once on a contiguous
    block; an expert with no token runs on an empty block, so its parameters still join backward (DDP and FSDP
    expect every parameter to get a gradient). Outputs return to their slots by a permutation and are summed
    over k, with no scatter-add: the result is deterministic on every device."""
    tokens, k = expert_idx.shape
    order = expert_idx.flatten().argsort(stable=True)
    counts = torch.bincount(expert_idx.flatten(), minlength=len(experts)).tolist()  # one host sync per layer
    blocks = x[order // k].split(counts)
    out = torch.cat([expert(block) for expert, block in zip(experts, blocks, strict=True)])
    out = out * weights.flatten()[order].unsqueeze(-1).to(out.dtype)
    by_slot = torch.empty_like(out)
    by_slot[order] = out
    return by_slot.view(tokens, k, -1).sum(dim=1)


def balancing_loss(scores: torch.Tensor, expert_idx: torch.Tensor, batch: int, per_sequence: bool) -> torch.Tensor:
    """E * sum_i f_i * P_i (without the coefficient): 1 when routing is uniform, up to E when one expert takes
    everything. f_i: share of routed slots sent to expert i; P_i: mean router probability of expert i. Taken over
    the whole micro-batch, or per sequence and averaged (`per_sequence`)."""
    num_experts = scores.size(-1)
    groups = batch if per_sequence else 1
    scores, expert_idx = scores.view(groups, -1, num_experts), expert_idx.view(groups, -1)
    share = F.one_hot(expert_idx, num_experts).to(scores.dtype).mean(dim=1)  # a sum, not a scatter: deterministic
    return num_experts * (share * scores.mean(dim=1)).sum(dim=-1).mean()


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def expert_balance(routed: torch.Tensor) -> torch.Tensor:
    """routed (layers, experts) slot counts -> the busiest expert's share divided by the uniform share, averaged
    over layers (a 0-d tensor on routed's device): 1.0 is perfect balance, num_experts means one expert takes every
    token."""
    routed = routed.to(exact_dtype(routed.device))
    uniform = routed.sum(dim=1) / routed.size(1)
    return (routed.max(dim=1).values / uniform.clamp(min=1e-12)).mean()


@torch.no_grad()
def end_of_step(model: nn.Module, world, bias_update_rate: float, applied: torch.Tensor | None = None):
    """After each optimizer step: the step's expert balance over every data-parallel rank (a device tensor: nothing
    is read back to the host), and (rate > 0) the auxiliary-loss-free bias update: each expert's bias moves by
    `rate` toward equal load (up when it got fewer slots than the mean, down when more). Every rank sees the same
    global counts, so biases stay identical. applied: 0 when the spike guard dropped the step's update (the
    biases then stay too), 1 or None otherwise. Returns None for a dense model."""
    layers = [m for m in moe_layers(model) if m.routed_tokens is not None]
    if not layers:
        return None
    routed = torch.stack([m.routed_tokens for m in layers]).to(exact_dtype(layers[0].routed_tokens.device))
    for m in layers:
        m.routed_tokens = None
    world.sum_over_dp_(routed)
    if bias_update_rate > 0:
        rate = bias_update_rate if applied is None else bias_update_rate * applied.to(routed.dtype)
        for m, load in zip(layers, routed, strict=True):
            step = torch.sign(load.mean() - load) * rate
            m.expert_bias += step.to(m.expert_bias.device, m.expert_bias.dtype)
    return expert_balance(routed)


def active_parameters(model: nn.Module, total: int) -> int:
    """Parameters one token passes through: the total minus the routed experts outside its top-k."""
    return total - sum(m.inactive_parameters() for m in moe_layers(model))

