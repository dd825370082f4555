"""Pipeline parallelism: successive runs of MiniMind's blocks on successive ranks, with torch.distributed.pipelining
running the micro-batches through them (GPipe, 1F1B or interleaved 1F1B).

    pipeline = Pipeline(model, world, cfg.parallel, grad_accum, wrap)   # every rank builds the whole model first
    loss = pipeline.forward_backward(micro_batches, loss_scale)        # one training step's gradients
    pipeline.sync_tied_gradients()                                      # embedding (first) == head (last stage)
    logits = pipeline(input_ids, doc_ids=...).logits                   # evaluation; None except on the last stage

Stage s of S = pipeline_parallel x pp_stages_per_rank holds an even share of the blocks; the first also holds the
embedding, the last the final norm and the head. The head is tied to the embedding: the last stage keeps its own
copy of that matrix, under the same name (`embed_tokens.weight`), and after each backward the two copies' gradients
are summed, so both stay equal, as one shared matrix would. Rank r holds stages r, r + P, r + 2P, ... (the looped
layout interleaved 1F1B needs). Parameter names are the full model's (`layers.5.mlp.up_proj.weight`), so
checkpoints load on any layout.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn

from minipretrain.config import ParallelConfig, pipeline_shape
from minipretrain.model import LMOutput, MiniMind, cross_entropy_sum

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def layer_split(num_layers: int, num_stages: int) -> list[range]:
    """The blocks of each stage: consecutive, as even as possible (earlier stages take the remainder; the last
    one also computes the head)."""
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


class PipelineStageModule(MiniMind):
    """Some of a MiniMind's parts, under the same names: the embedding (first stage; and last, as the tied head's
    weight), a run of blocks (`layers` keyed by their index in the model), the final norm and head (last stage).
    forward: token ids (first stage) or hidden states -> hidden states, or logits (last stage)."""

    def __init__(self, model: MiniMind, layers, first: bool, last: bool):
        nn.Module.__init__(self)
        self.config, self.causal, self.attn_backend = model.config, model.causal, model.attn_backend
        self.is_first, self.is_last = first, last
        # Registered before lm_head: the tied matrix is then named embed_tokens.weight here as in the model, for
        # the optimizer's state as for the weights.
        self.embed_tokens = model.embed_tokens if first or last else None
        self.dropout = model.dropout
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x, doc_ids=None):
        cos, sin, doc_mask = self.attention_inputs(x.size(1), 0, doc_ids)
        if self.is_first:
            x = self.dropout(self.embed_tokens(x))
        for block in self.layers.values():
            x = block(x, cos, sin, None, doc_mask)
        return self.lm_head(self.norm(x)) if self.is_last else x

    def blocks(self) -> list[nn.Module]:
        return list(self.layers.values())


def schedule_class(name: str):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}[name]


class Pipeline:
    """This rank's part of a pipeline-parallel MiniMind (see the module docstring).

    `module` holds every parameter of this rank's stages: the optimizer, checkpoints, gradient clipping and the
    spike guard's snapshot use it. `wrap(stage_module)` applies tensor parallelism and FSDP to each stage and
    returns what the schedule should call. average_replicas: data-parallel replicas (parallel.mode=ddp), whose
    gradients forward_backward averages over the "dp" ranks in one all-reduce after the last backward."""

    def __init__(self, model: MiniMind, world, cfg: ParallelConfig, grad_accum: int, wrap,
                 average_replicas: bool = False):
        from torch.distributed.pipelining import PipelineStage

        self.world, self.config, self.causal = world, model.config, model.causal
        per_rank, self.microbatches = pipeline_shape(cfg, grad_accum)
        pp, rank = world.pp_size, world.pp_rank
        self.num_stages = pp * per_rank
        splits = layer_split(model.config.num_hidden_layers, self.num_stages)
        self.stage_ids = [rank + k * pp for k in range(per_rank)]
        first, last = 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids
        self.stages = [PipelineStageModule(model, splits[s], s == 0, s == self.num_stages - 1)
                       for s in self.stage_ids]
        self.module = self.stages[0] if per_rank == 1 else PipelineStageModule(
            model, [i for s in self.stage_ids for i in splits[s]], first, last)
        self.training = True
        self._group = world.mesh.get_group("pp")
        pipeline_stages = [PipelineStage(wrap(stage), s, self.num_stages, world.device, group=self._group)
                           for stage, s in zip(self.stages, self.stage_ids, strict=True)]
        self.loss_scale: torch.Tensor | float = 1.0
        schedule = schedule_class(cfg.pp_schedule)
        self.schedule = schedule(pipeline_stages if per_rank > 1 else pipeline_stages[0], self.microbatches,
                                 loss_fn=self._loss, scale_grads=False)
        self._tie_group = _tied_pair_group(world)
        self._replica_group = world.mesh.get_group("dp") if average_replicas else None
        # Counted once in the gradient norm: on the first stage (the last holds an equal copy).
        self.norm_excluded = [self.module.embed_tokens.weight] if last and not first else []

    def _loss(self, logits, labels):
        return cross_entropy_sum(logits, labels, self.causal) * self.loss_scale

    def forward_backward(self, micro_batches, loss_scale) -> torch.Tensor:
        """Forward and backward of one step's micro-batches (this data-parallel rank's), run as the pipeline's
        micro-batches. Each micro-batch's summed cross-entropy is multiplied by loss_scale; returns their sum on
        the last stage, 0 elsewhere (a device tensor: nothing is read back to the host)."""
        device = self.world.device
        micro_batches = [b.to(device) for b in micro_batches]  # each from pinned memory, then joined on the device
        inputs, labels = torch.cat([b.inputs for b in micro_batches]), torch.cat([b.labels for b in micro_batches])
        kwargs = {}
        if any(b.doc_ids is not None for b in micro_batches):  # padded rows give doc_ids only where they pad
            kwargs["doc_ids"] = torch.cat([b.doc_ids if b.doc_ids is not None else torch.zeros_like(b.inputs)
                                           for b in micro_batches])  # zeros: one document per row, as without
        self.loss_scale = loss_scale
        losses: list[torch.Tensor] = []
        args = (inputs,) if 0 in self.stage_ids else ()
        self.schedule.step(*args, target=labels, losses=losses, return_outputs=False, **kwargs)
        if self._replica_group is not None:
            _average_gradients(self.module, self._replica_group, self.world.dp_size)
        return torch.stack(losses).sum().detach() if losses else torch.zeros((), device=device)

    def sync_tied_gradients(self) -> None:
        """Sum the embedding's gradient (first stage) and the tied head's (last stage): both copies then take the
        same update, as the one shared matrix of an unsplit model would."""
        if self._tie_group is None:
            return
        grad = self.module.embed_tokens.weight.grad
        if grad is None:
            grad = self.module.embed_tokens.weight.grad = torch.zeros_like(self.module.embed_tokens.weight)
        dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=self._tie_group)

    # Evaluation: a plain forward through the stages, one batch at a time (collective over the pipeline ranks).
    def __call__(self, input_ids, doc_ids=None) -> LMOutput:
        pp, device = self.world.pp_size, self.world.device
        doc_ids = doc_ids.to(device) if doc_ids is not None else None
        x = None
        for stage, s in zip(self.stages, self.stage_ids, strict=True):  # in order: stage s waits for s - 1
            x = input_ids.to(device) if s == 0 else self._recv((s - 1) % pp)
            x = stage(x, doc_ids=doc_ids)
            if s < self.num_stages - 1:
                self._send(x, (s + 1) % pp)
        return LMOutput(x if self.num_stages - 1 in self.stage_ids else None, None)

    def _send(self, x: torch.Tensor, pp_rank: int) -> None:
        peer = dist.get_global_rank(self._group, pp_rank)
        header = torch.tensor([x.dim(), *x.shape, *[0] * (4 - x.dim()), _DTYPES.index(x.dtype)], device=x.device)
        dist.send(header, peer, group=self._group)
        dist.send(x.detach().contiguous(), peer, group=self._group)

    def _recv(self, pp_rank: int) -> torch.Tensor:
        peer = dist.get_global_rank(self._group, pp_rank)
        header = torch.zeros(6, dtype=torch.long, device=self.world.device)
        dist.recv(header, peer, group=self._group)
        ndim, *shape, dtype = header.tolist()
        x = torch.empty(shape[:ndim], dtype=_DTYPES[dtype], device=self.world.device)
        dist.recv(x, peer, group=self._group)
        return x

    def train(self, mode: bool = True) -> Pipeline:
        self.training = mode
        for stage in self.stages:
            stage.train(mode)
        self.module.train(mode)
        return self

    def eval(self) -> Pipeline:
        return self.train(False)


def _tied_pair_group(world):
    """The process group of this rank's first-stage and last-stage peers (same data- and tensor-parallel
    coordinates), which keep the tied embedding equal; None on the other pipeline ranks. Every rank creates every
    pair's group, in the same order, as new_group requires."""
    ranks = world.mesh.mesh  # (pp, dp, tp) global ranks
    mine = None
    for d in range(ranks.size(1)):
        for t in range(ranks.size(2)):
            pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
            group = dist.new_group(pair)
            if world.rank in pair:
                mine = group
    return mine


def _average_gradients(module: nn.Module, group, size: int) -> None:
    """DDP's gradient average over `size` replicas, in one flat all-reduce."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat.div_(size)
    for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(averaged)
