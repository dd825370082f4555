"""Learning-rate schedules: a pure function of the step, so resuming needs nothing but the step number.

`step` is the 0-based index of the optimizer step about to be taken; `max_steps` the total.
- cosine:   linear warmup to lr, then cosine from lr to min_lr, reaching min_lr on the last step
- minimind: MiniMind's lr/10 + 0.5*lr*(1 + cos(pi*step/max_steps)) (min_lr unused), after optional warmup
- wsd:      warmup, stable at lr, then a linear decay to min_lr over the final decay_fraction of the steps (or
            the final decay_steps steps)
"""

from __future__ import annotations

import math

from minipretrain.config import OptimConfig


def steps_for_epochs(epochs: float, rows: int, rows_per_step: int) -> int:
    """The optimizer steps that pass `epochs` times over `rows` training rows, rows_per_step at a time (batch x
    accumulation x data-parallel ranks); a partial last step counts."""
    return max(1, math.ceil(epochs * rows / rows_per_step))


def _minimind(step: int, lr: float, max_steps: int) -> float:
    return lr / 10 + 0.5 * lr * (1 + math.cos(math.pi * step / max_steps))


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    warmup = min(cfg.warmup_steps, max_steps)
    if step < warmup:
        peak = _minimind(warmup, cfg.lr, max_steps) if cfg.schedule == "minimind" else cfg.lr
        return peak * (step + 1) / warmup
    if cfg.schedule == "minimind":
        return _minimind(step, cfg.lr, max_steps)
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, max_steps - 1 - warmup)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "wsd":
        decay_steps = cfg.decay_steps or max(1, round(cfg.decay_fraction * max_steps))
        decay_start = max(warmup, max_steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start + 1) / max(1, max_steps - decay_start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(progress, 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
