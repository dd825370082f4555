"""One training step's arithmetic, without host synchronisation: every number stays a device tensor until the
trainer reads a whole window of steps back at once (train.log_every), so a GPU never waits for the Python loop.

    loss, aux = accumulate_gradients(step_model, micro_batches, autocast, scaler, world, causal, target_counts)
    grad_norm = unscale_and_clip(model, optimizer, scaler, grad_clip, world)
    finish_step(optimizer, scaler, skip=bad)           # bad: a device bool from the spike guard

The one exception is an fp16 gradient scaler (old GPUs without bf16), which reads its overflow flag, and the
guard's with it, once per step; and a mixture of experts, whose dispatch reads each layer's per-expert token
counts to split the tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from minipretrain.parallel import Pipeline, World, clip_grad_norm, gradient_sync
from minipretrain.precision import exact_dtype


def accumulate_gradients(step_model, micro_batches, autocast, scaler, world: World | None = None,
                         causal: bool = True, target_counts: list[int] | None = None):
    """Forward and backward over this rank's micro-batches of a step; returns the step's mean loss over all ranks
    and its MoE balancing loss (0 for a dense model), as device tensors (float64; float32 on MPS).

    Each micro-batch is weighted by its share of the global step's predicted tokens (the balancing loss, a mean
    over sequences, by its share of rows), so accumulating over micro-steps and ranks equals one big batch even
    when padding makes micro-batches unequal. `causal`: the model's attention, which decides what it predicts.
    target_counts: each micro-batch's predicted tokens, when the loader counted them already."""
    from minipretrain.data.prefetch import target_count

    world = World() if world is None else world
    counts = target_counts if target_counts is not None else [target_count(b, causal) for b in micro_batches]
    rows = sum(len(batch.inputs) for batch in micro_batches)
    if world.dp_size > 1:  # the global totals, summed on the device (copied from pinned memory: no wait)
        totals = torch.tensor([float(sum(counts)), float(rows)], dtype=exact_dtype(world.device))
        totals = totals.pin_memory() if world.device.type == "cuda" else totals
        total_count, total_rows = world.sum_over_dp_(totals.to(world.device, non_blocking=True))
        total_count = total_count.clamp(min=1)
    else:
        total_count, total_rows = max(sum(counts), 1), rows
    if isinstance(step_model, Pipeline):
        with autocast:  # the schedule runs the forwards inside step(); summed cross-entropy x dp / global count
            loss = step_model.forward_backward(micro_batches, _fraction(world.dp_size, total_count))
        loss = world.from_last_stage_(loss.to(exact_dtype(world.device)) / world.dp_size)
        return world.sum_over_dp_(loss), torch.zeros_like(loss)
    step_loss = torch.zeros((), dtype=exact_dtype(world.device), device=world.device)
    step_aux = torch.zeros_like(step_loss)
    for i, (batch, count) in enumerate(zip(micro_batches, counts, strict=True)):
        batch = batch.to(world.device)
        with gradient_sync(step_model, last_micro_step=i == len(micro_batches) - 1):
            with autocast:
                out = step_model(batch.inputs, labels=batch.labels, doc_ids=batch.doc_ids)
                loss = out.loss * _fraction(count, total_count)
                aux = out.aux_loss * _fraction(len(batch.inputs), total_rows) if out.aux_loss is not None else None
            # DDP and FSDP average gradients over the data-parallel ranks: scaling by their number turns that
            # average into the sum, i.e. the mean over every predicted token of the global batch.
            scaler.scale((loss if aux is None else loss + aux) * world.dp_size).backward()
        step_loss += loss.detach().to(step_loss.dtype)
        if aux is not None:
            step_aux += aux.detach().to(step_aux.dtype)
    totals = world.sum_over_dp_(torch.stack([step_loss, step_aux]))
    return totals[0], totals[1]


def _fraction(part, whole):
    """part / whole as a loss weight: a Python float when both are host numbers, else a float32 device scalar
    (computed in float64 first, as the host division would be)."""
    if isinstance(whole, torch.Tensor):
        return (part / whole).float()
    return part / whole


def unscale_and_clip(model, optimizer, scaler, grad_clip: float, world: World | None = None,
                     not_counted=()) -> torch.Tensor:
    """Unscale and clip (0 = no clipping) the gradients; returns their global norm before clipping (a device
    tensor). not_counted: parameters left out of the norm (a pipeline's second copy of the tied embedding)."""
    scaler.unscale_(optimizer)
    return clip_grad_norm(model.parameters(), grad_clip, world, not_counted)


def finish_step(optimizer, scaler, skip: torch.Tensor | bool = False) -> None:
    """Step unless `skip` (the spike guard dropped this update: then neither weights nor Adam moments nor Adam's
    step count see it), then clear the gradients. With a fused AdamW the skip is the kernel's own found_inf flag,
    read on the device; an fp16 scaler or another optimizer decides on the host."""
    on_device = isinstance(skip, torch.Tensor) and optimizer.defaults.get("fused") and not scaler.is_enabled()
    if on_device:
        optimizer.found_inf = skip.to(torch.float32).reshape(())
        optimizer.step()
        del optimizer.found_inf
    elif not bool(skip):
        scaler.step(optimizer)
    scaler.update()  # an fp16 scaler still learns from an overflow, whoever skipped the step
    optimizer.zero_grad(set_to_none=True)


def apply_gradients(model, optimizer, scaler, grad_clip: float) -> torch.Tensor:
    """Unscale, clip, step, clear; returns the global gradient norm before clipping (a device tensor)."""
    grad_norm = unscale_and_clip(model, optimizer, scaler, grad_clip)
    finish_step(optimizer, scaler)
    return grad_norm


class StepNumbers(NamedTuple):
    """A step's numbers, read back to the host."""
    step: int
    lr: float
    loss: float
    aux_loss: float
    grad_norm: float
    balance: float | None  # MoE expert balance (None for a dense model)
    verdict: list[float]  # the spike guard's (train/stability.py)
    drawn_before: list[int]  # the sampler's draws per source before and after the step
    drawn_after: list[int]
    tokens_by_source: dict


class StepWindow:
    """The steps since the last read-back, whose numbers are still device tensors: read() brings them all to the
    host in one transfer, so a GPU synchronises once per window instead of once per step."""

    def __init__(self):
        self._steps: list[tuple] = []

    def add(self, step: int, lr: float, loss, aux_loss, grad_norm, verdict, balance, data) -> None:
        """data: the step's StepData; only its data positions are kept, not its batches."""
        self._steps.append((step, lr, loss, aux_loss, grad_norm, verdict, balance, data.drawn_before,
                            data.drawn_after, data.tokens_by_source))

    def read(self) -> list[StepNumbers]:
        steps, self._steps = self._steps, []
        if not steps:
            return []
        nan = torch.full((), math.nan, dtype=steps[0][5].dtype, device=steps[0][5].device)
        rows = torch.stack([torch.cat([torch.stack([loss.to(nan.dtype), aux.to(nan.dtype), norm.to(nan.dtype),
                                                    (balance if balance is not None else nan).to(nan.dtype)]),
                                       verdict])
                            for _, _, loss, aux, norm, verdict, balance, *_ in steps]).tolist()
        return [StepNumbers(step, lr, row[0], row[1], row[2], row[3] if balance is not None else None, row[4:],
                            before, after, by_source)
                for (step, lr, _, _, _, _, balance, before, after, by_source), row in zip(steps, rows, strict=True)]
