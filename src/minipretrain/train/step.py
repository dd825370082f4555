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

import torch

from minipretrain.parallel import Pipeline, World, clip_grad_norm, gradient_sync


def accumulate_gradients(step_model, micro_batches, autocast, scaler, world: World | None = None,
                         causal: bool = True, target_counts: list[int] | None = None):
    """Forward and backward over this rank's micro-batches of a step; returns the step's mean loss over all ranks
    and its MoE balancing loss (0 for a dense model), as float64 device tensors.

    Each micro-batch is weighted by its share of the global step's predicted tokens (the balancing loss, a mean
    over sequences, by its share of rows), so accumulating over micro-steps and ranks equals one big batch even
    when padding makes micro-batches unequal. `causal`: the model's attention, which decides what it predicts.
    target_counts: each micro-batch's predicted tokens, when the loader counted them already."""
    from minipretrain.data.prefetch import target_count

    world = World() if world is None else world
    counts = target_counts if target_counts is not None else [target_count(b, causal) for b in micro_batches]
    rows = sum(len(batch.inputs) for batch in micro_batches)
    if world.dp_size > 1:  # the global totals, summed on the device
        total_count, total_rows = world.sum_over_dp_(
            torch.tensor([float(sum(counts)), float(rows)], dtype=torch.float64, device=world.device))
        total_count = total_count.clamp(min=1)
    else:
        total_count, total_rows = max(sum(counts), 1), rows
    if isinstance(step_model, Pipeline):
        with autocast:  # the schedule runs the forwards inside step(); summed cross-entropy x dp / global count
            loss = step_model.forward_backward(micro_batches, _fraction(world.dp_size, total_count))
        loss = world.from_last_stage_(loss.double() / world.dp_size)
        return world.sum_over_dp_(loss), torch.zeros_like(loss)
    step_loss = torch.zeros((), dtype=torch.float64, device=world.device)
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
        step_loss += loss.detach().double()
        if aux is not None:
            step_aux += aux.detach().double()
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
    fused = optimizer.defaults.get("fused") and not scaler.is_enabled()
    if fused:
        optimizer.found_inf = torch.as_tensor(skip, dtype=torch.float32, device=_device_of(optimizer)).reshape(())
        optimizer.step()
        del optimizer.found_inf
    elif not bool(skip):
        scaler.step(optimizer)
    scaler.update()  # an fp16 scaler still learns from an overflow, whoever skipped the step
    optimizer.zero_grad(set_to_none=True)


def _device_of(optimizer) -> torch.device:
    p = optimizer.param_groups[0]["params"][0]
    return p.to_local().device if hasattr(p, "to_local") else p.device


def apply_gradients(model, optimizer, scaler, grad_clip: float) -> torch.Tensor:
    """Unscale, clip, step, clear; returns the global gradient norm before clipping (a device tensor)."""
    grad_norm = unscale_and_clip(model, optimizer, scaler, grad_clip)
    finish_step(optimizer, scaler)
    return grad_norm
