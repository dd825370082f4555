"""The loss-spike guard: every step's loss and gradient norm are checked before its update is applied.

    guard = SpikeGuard(cfg.guard, warmup_steps=cfg.optim.warmup_steps)
    reason = guard.check(step, loss, grad_norm)     # None for a good step, else why it is bad
    if reason is None: guard.accept(loss, grad_norm); optimizer.step()
    else: guard.record_spike(step, loss, draws); if guard.wants_rollback(): snapshot.restore(model, optimizer, scaler)

A step is bad when its loss or gradient norm is not finite, or (after guard.min_step, with at least MIN_HISTORY
good steps behind it) when its loss is above guard.loss_factor x the running mean of the last guard.window good
losses, or guard.loss_z standard deviations above it, or its gradient norm above guard.grad_norm_factor x their
running median. Only good steps enter the statistics, so a burst of spikes does not raise the bar for the next;
but guard.max_spikes statistical spikes in a row under action=skip are a new level, not a spike: the statistics
start again from it (a "rebaseline" event) instead of skipping every step from then on.
The decisions depend only on values every rank holds (the global loss and gradient norm) and on the guard's state,
which is saved in each checkpoint: a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from minipretrain.config import GuardConfig
from minipretrain.train.checkpoint import cpu_copy

MIN_HISTORY = 10  # good steps needed before the running statistics are trusted


class SpikeGuard:
    def __init__(self, cfg: GuardConfig, warmup_steps: int):
        self.cfg = cfg
        self.min_step = warmup_steps if cfg.min_step is None else cfg.min_step
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.grad_norms: deque[float] = deque(maxlen=cfg.window)
        self.spike_steps: list[int] = []  # bad steps within the last guard.window steps, for rollback
        self.skipped: list[dict] = []  # {"step", "draws"}: the samples whose update was dropped
        self.counts = {"spike_skipped": 0, "nan": 0, "rollback": 0, "rebaseline": 0}
        self.consecutive = 0  # statistical spikes in a row (not NaN): a lasting shift, if guard.max_spikes of them
        self.lr_scaled_until = 0  # steps up to this one run at guard.lr_factor x the scheduled rate

    def check(self, step: int, loss: float, grad_norm: float, check_grad_finite: bool = True) -> str | None:
        """Why step `step` (1-based) is bad, or None. check_grad_finite=False with an fp16 gradient scaler: an
        overflowing gradient is its business (it skips the step and lowers the scale), not a spike."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}" if check_grad_finite else None
        if step <= self.min_step or len(self.losses) < min(MIN_HISTORY, self.cfg.window):
            return None
        c = self.cfg
        mean = statistics.fmean(self.losses)
        if c.loss_factor and loss > c.loss_factor * mean:
            return f"loss {loss:.4f} is above {c.loss_factor:g} x its running mean {mean:.4f}"
        if c.loss_z:
            std = statistics.pstdev(self.losses, mean)
            if std > 0 and (loss - mean) / std > c.loss_z:
                return f"loss {loss:.4f} is {(loss - mean) / std:.1f} standard deviations above its mean {mean:.4f}"
        if c.grad_norm_factor:
            median = statistics.median(self.grad_norms)
            if grad_norm > c.grad_norm_factor * median:
                return (f"gradient norm {grad_norm:.4g} is above {c.grad_norm_factor:g} x its running median "
                        f"{median:.4g}")
        return None

    def accept(self, loss: float, grad_norm: float) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.consecutive = 0

    def record_spike(self, step: int, loss: float, draws: dict) -> str:
        """Count a bad step whose update was dropped; returns its event: "nan" or "spike_skipped"."""
        event = "spike_skipped" if math.isfinite(loss) else "nan"
        self.counts[event] += 1
        self.consecutive = self.consecutive + 1 if event == "spike_skipped" else 0
        self.skipped.append({"step": step, "draws": draws})
        self.spike_steps = [s for s in self.spike_steps if s > step - self.cfg.window] + [step]
        return event

    def wants_rollback(self) -> bool:
        """guard.action=rollback and guard.max_spikes bad steps within the last guard.window steps."""
        return self.cfg.action == "rollback" and len(self.spike_steps) >= self.cfg.max_spikes

    def level_shifted(self) -> bool:
        """guard.action=skip and guard.max_spikes statistical spikes in a row: not a spike but a new level (the
        gradient norm of a run that leaves a plateau can settle 10x higher). Skipping on would freeze training."""
        return self.cfg.action == "skip" and self.consecutive >= self.cfg.max_spikes

    def rebaseline(self) -> None:
        """Forget the running statistics: the next MIN_HISTORY good steps build them anew from the new level."""
        self.losses.clear()
        self.grad_norms.clear()
        self.consecutive = 0
        self.counts["rebaseline"] += 1

    def rolled_back(self, step: int) -> bool:
        """Note a rollback at `step`; False when it is one more than guard.max_rollbacks (time to stop)."""
        self.counts["rollback"] += 1
        self.spike_steps = []
        self.lr_scaled_until = step + self.cfg.lr_steps
        return self.counts["rollback"] <= self.cfg.max_rollbacks

    def lr_scale(self, step: int) -> float:
        """The learning-rate factor for step `step` (1-based): guard.lr_factor for a while after a rollback."""
        return self.cfg.lr_factor if step <= self.lr_scaled_until else 1.0

    def summary(self) -> dict:
        return dict(self.counts)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "spike_steps": list(self.spike_steps),
                "skipped": list(self.skipped), "counts": dict(self.counts), "lr_scaled_until": self.lr_scaled_until,
                "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.losses.extend(state["losses"])
        self.grad_norms.extend(state["grad_norms"])
        self.spike_steps = list(state["spike_steps"])
        self.skipped = list(state["skipped"])
        self.counts.update(state["counts"])
        self.consecutive = state.get("consecutive", 0)
        self.lr_scaled_until = state["lr_scaled_until"]


class Snapshot:
    """What a rollback restores: a CPU copy of this rank's weights, optimizer state and gradient scaler, taken at
    the start of a run and at every checkpoint save (so a resumed run holds the same snapshot as an uninterrupted
    one). Costs host memory: about 12 bytes per parameter (fp32 weights and two Adam moments), split over ranks
    under FSDP."""

    def __init__(self):
        self.step: int | None = None
        self.draws: list[int] = []  # the data position then, to report what the rollback skips
        self._state = None

    def take(self, step: int, model, optimizer, scaler, draws: list[int]) -> None:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(cpu_offload=True))
        self._state = cpu_copy({"model": model_state, "optimizer": optimizer_state, "scaler": scaler.state_dict()})
        self.step, self.draws = step, list(draws)

    def restore(self, model, optimizer, scaler) -> None:
        # A fresh copy each time: loading may keep references to the tensors it is given (the optimizer state
        # does), and the snapshot must stay intact for a later rollback.
        state = cpu_copy(self._state)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
