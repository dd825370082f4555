"""The MiniMind decoder, top to bottom.

token ids -> tied embedding -> N x [RMSNorm -> grouped-query attention with RoPE -> residual,
                                    RMSNorm -> SwiGLU feed-forward (or a mixture of SwiGLU experts,
                                    moe.py) -> residual]
          -> final RMSNorm -> logits through the (tied) embedding matrix
Optional document masking (doc_ids): packed documents attend only within themselves and restart RoPE at 0.
Attention is causal (a language model, labels shifted by one) or, with `attention = "bidirectional"`, sees the whole
row (a masked LM, each position scored against its own label).

Parameter names follow Hugging Face's Llama/Qwen layout (embed_tokens, layers.N.self_attn.q_proj, ...), so the
weights map one to one onto `transformers` models. This file knows nothing about devices, precision or
parallelism; the trainer applies those from outside.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minipretrain.config import ModelConfig
from minipretrain.moe import MoEFeedForward, active_parameters

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # a torch without FlexAttention: document masks go through SDPA with a dense mask
    create_block_mask = flex_attention = None


class LMOutput(NamedTuple):
    logits: torch.Tensor  # (batch, seq, vocab)
    loss: torch.Tensor | None  # mean cross-entropy over labels != -100
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (training mode), to add to loss for backward


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Under autocast q and k arrive in bf16: a float32 weight would force the slow unfused kernel.
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim) in the "rotate half" layout used by Llama, Qwen and MiniMind."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim), or (batch, 1, seq, head_dim) for per-row
    positions. The tables are cast to x's dtype, so bf16 q/k under autocast stay bf16 (float32 tables would
    promote them, doubling what backward keeps)."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def document_runs(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids (batch, seq) -> (run, position), both (batch, seq): which contiguous run of equal ids each token
    belongs to (counted from 1 in its row) and its index within that run. Mask and RoPE both use the runs, so
    they agree even if a row reuses an id for two separate documents."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    index = torch.arange(doc_ids.size(1), device=doc_ids.device).expand_as(doc_ids)
    run_start = torch.where(starts, index, 0).cummax(dim=1).values  # index of the latest run start so far
    return starts.cumsum(dim=1), index - run_start


def document_mask_mod(run: torch.Tensor, causal: bool = True):
    """FlexAttention mask_mod: query q sees key k when both lie in the same run (and, if causal, k is not in the
    future). Called with broadcastable index tensors it also builds the dense mask (see dense_document_mask)."""

    def mask_mod(b, h, q_idx, kv_idx):
        same_run = run[b, q_idx] == run[b, kv_idx]
        return (kv_idx <= q_idx) & same_run if causal else same_run

    return mask_mod


def dense_document_mask(run: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The boolean (batch, 1, seq, seq) mask for SDPA, True where attention is allowed."""
    batch, seq = run.shape
    i = torch.arange(seq, device=run.device)
    b = torch.arange(batch, device=run.device).view(batch, 1, 1, 1)
    return document_mask_mod(run, causal)(b, 0, i.view(1, 1, seq, 1), i.view(1, 1, 1, seq))


def prediction_targets(labels: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The label each position is scored against: the next position's for a causal LM (the last position predicts
    nothing), its own for a bidirectional masked LM. Shifting the labels, not the logits, never copies the logits."""
    return F.pad(labels[:, 1:], (0, 1), value=-100) if causal else labels


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The summed cross-entropy (in float32) of the positions that have a label (see prediction_targets)."""
    targets = prediction_targets(labels, causal)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


def attention_backend(device: torch.device | str, head_dim: int) -> str:
    """How document-masked attention runs: "flex" (FlexAttention, skips fully masked blocks) on CUDA when it
    imports and the heads are at least 16 wide (its GPU kernels' minimum), else "sdpa" with a dense boolean mask.
    FlexAttention on the CPU runs the forward only (no backward in torch 2.11 and 2.13), so CPU gets "sdpa"."""
    usable = flex_attention is not None and torch.device(device).type == "cuda" and head_dim >= 16
    return "flex" if usable else "sdpa"


@functools.cache
def compiled(fn):
    """`fn` compiled once per process. Eager flex_attention materialises the full score matrix, and eager
    create_block_mask builds batch x seq x seq tensors on every call; compiled, both are fused kernels."""
    return torch.compile(fn)


class KVCache:
    """Keys and values of every layer so far, for incremental decoding."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        return self.keys[0].size(2) if self.keys else 0

    def update(self, layer: int, k, v):
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.head_dim = cfg.head_dim
        n_heads, n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(cfg.hidden_size, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.causal = cfg.attention == "causal"

    def forward(self, x, cos, sin, cache: KVCache | None = None, doc_mask=None):
        """doc_mask: None (plain causal, or no mask at all when bidirectional), a boolean (batch, 1, seq, seq) mask
        for SDPA, or a FlexAttention BlockMask."""
        batch, seq, _ = x.shape
        # Head counts come from the projections' widths, so a tensor-parallel shard (a slice of the heads)
        # runs this same code.
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        n_heads, n_kv_heads = q.size(1), k.size(1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if doc_mask is not None and not torch.is_tensor(doc_mask):  # a BlockMask (never with a cache)
            flex = compiled(flex_attention) if q.is_cuda else flex_attention
            y = flex(q, k, v, block_mask=doc_mask, enable_gqa=n_kv_heads != n_heads)
            return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))

        past = 0
        if cache is not None:
            past = cache.keys[self.layer].size(2) if self.layer < len(cache.keys) else 0
            k, v = cache.update(self.layer, k, v)
        # Without history the mask is plain causal; one new token sees everything; a chunk after history
        # sees the history plus the causal part of itself.
        mask, causal = None, self.causal and seq > 1
        if past and seq > 1:
            mask = torch.ones(seq, past + seq, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        if doc_mask is not None:
            mask, causal = doc_mask, False
        # Grouped-query attention: each kv head serves n_heads / n_kv_heads query heads. SDPA shares them in place
        # (enable_gqa) without a mask, on the CPU and in CUDA's flash kernel (fp16/bf16 only); elsewhere the
        # kernels that take a mask or float32 (memory-efficient) need the kv heads repeated.
        share_kv = n_kv_heads != n_heads and mask is None and (
            q.device.type == "cpu" or (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)))
        if n_kv_heads != n_heads and not share_kv:
            repeat = n_heads // n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=share_kv,
        )
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.moe:  # the experts are SwiGLUs like the dense one, each moe_intermediate_size wide
            self.mlp = MoEFeedForward(cfg, make_expert=lambda width: FeedForward(cfg.hidden_size, width))
        else:
            self.mlp = FeedForward(cfg.hidden_size, cfg.intermediate_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, doc_mask=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, doc_mask))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class MiniMind(nn.Module):
    # Backend for document-masked attention: None picks attention_backend(device, head_dim); "flex" or "sdpa"
    # forces one (tests set "flex" to compare the two on CPU).
    attn_backend: str | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.causal = cfg.attention == "causal"
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one matrix reads and writes tokens
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: the two projections that write into the residual stream shrink with depth,
        # so the residual's variance stays flat however many layers are stacked.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def attention_backend_for(self, device) -> str:
        backend = self.attn_backend or attention_backend(device, self.config.head_dim)
        if backend == "flex" and self.training and self.config.dropout > 0:
            return "sdpa"  # FlexAttention has no attention dropout
        return backend

    def _document_mask(self, run: torch.Tensor):
        if self.attention_backend_for(run.device) == "flex":
            batch, seq = run.shape
            build = compiled(create_block_mask) if run.is_cuda else create_block_mask
            return build(document_mask_mod(run, self.causal), batch, None, seq, seq, device=run.device)
        return dense_document_mask(run, self.causal)

    def attention_inputs(self, seq: int, start: int = 0, doc_ids=None):
        """What every block's attention needs besides x: the RoPE cos and sin of each position (from `start`, or
        restarting at each document start) and the document mask (None without doc_ids), built once per forward."""
        if doc_ids is None:
            return self.rope_cos[start : start + seq], self.rope_sin[start : start + seq], None
        run, positions = document_runs(doc_ids)
        return (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1),
                self._document_mask(run))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once

    def num_active_parameters(self) -> int:
        """Parameters each token passes through (the total for a dense model)."""
        return active_parameters(self, self.num_parameters())

    def forward(self, input_ids, labels=None, cache: KVCache | None = None, doc_ids=None) -> LMOutput:
        """input_ids: (batch, seq). labels: same shape, aligned with input_ids (a causal model shifts them here,
        see prediction_targets), -100 where no loss is wanted. With a cache, positions continue after what it holds.
        doc_ids: optional (batch, seq) integers, equal within each contiguous document: attention stays inside a
        document and positions restart at 0 at each document start."""
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids and cache cannot be used together")
        if cache is not None and not self.causal:
            raise ValueError("a KV cache needs causal attention: bidirectional attention recomputes every position")
        if doc_ids is not None and doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
        start = cache.length if cache is not None else 0
        seq = input_ids.size(1)
        if start + seq > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + seq} tokens exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        cos, sin, doc_mask = self.attention_inputs(seq, start, doc_ids)
        x = self.dropout(self.embed_tokens(input_ids))
        for block in self.layers:
            x = block(x, cos, sin, cache, doc_mask)
        logits = self.lm_head(self.norm(x))
        aux_losses = [b.mlp.aux_loss for b in self.layers
                      if self.training and isinstance(b.mlp, MoEFeedForward) and b.mlp.aux_loss is not None]
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        loss = None
        if labels is not None:
            targets = prediction_targets(labels, self.causal)
            # a row of only padding gives 0, not nan
            loss = cross_entropy_sum(logits, labels, self.causal) / (targets != -100).sum().clamp(min=1)
        return LMOutput(logits, loss, aux_loss)
