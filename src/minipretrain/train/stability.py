"""The loss-spike guard: every step's loss and gradient norm are checked before its update is applied.

    guard = SpikeGuard(cfg.guard, warmup_steps=cfg.optim.warmup_steps, device=device)
    verdict = guard.check(step, loss, grad_norm)   # device tensors in and out: no host synchronisation
    optimizer.found_inf = (verdict[CODE] > 0).float(); optimizer.step()   # a bad step changes nothing
    guard.update(verdict)                          # the running statistics, on the device
    ... later, at a log line:  reason = guard.reason(verdict.tolist()); guard.record_spike(step, loss, draws)

A step is bad when its loss or gradient norm is not finite, or (after guard.min_step, with at least MIN_HISTORY
good steps behind it) when its loss is above guard.loss_factor x the running mean of the last guard.window good
losses, or guard.loss_z standard deviations above it, or its gradient norm above guard.grad_norm_factor x their
running median. Only good steps enter the statistics, so a burst of spikes does not raise the bar for the next;
but guard.max_spikes statistical spikes in a row under action=skip are a new level, not a spike: the statistics
start again from it (a "rebaseline") instead of skipping every step from then on.

The detection and the statistics live on the training device, so a step never waits for the host; what is only
reported (events, the skipped samples, rollback decisions) is done when the trainer next reads its numbers back
(every train.log_every steps, and before each validation or save). The decisions depend only on values every rank
holds (the global loss and gradient norm) and on the guard's state, which is saved in each checkpoint: a resumed
run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from minipretrain.config import GuardConfig
from minipretrain.precision import exact_dtype
from minipretrain.train.checkpoint import cpu_copy
from minipretrain.train.optim import optimizer_list

MIN_HISTORY = 10  # good steps needed before the running statistics are trusted
# A verdict: one device tensor (float64; float32 on MPS) with these fields. CODE 0 is a good step, else why it is
# bad (GOOD ... GRAD_FACTOR below); the trainer takes CODE's maximum over all ranks, LOCAL_CODE stays this rank's.
CODE, LOSS, GRAD_NORM, MEAN, STD, MEDIAN, REBASELINED, LOCAL_CODE = range(8)
GOOD, NAN_LOSS, NAN_GRAD, LOSS_FACTOR, LOSS_Z, GRAD_FACTOR = range(6)


class SpikeGuard:
    def __init__(self, cfg: GuardConfig, warmup_steps: int, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.min_step = warmup_steps if cfg.min_step is None else cfg.min_step
        self.device = torch.device(device)
        # The last guard.window good losses and gradient norms, as rings (NaN: empty), and where the next goes.
        self.dtype = exact_dtype(self.device)
        self.losses = torch.full((cfg.window,), math.nan, dtype=self.dtype, device=self.device)
        self.grad_norms = torch.full_like(self.losses, math.nan)
        self.head = torch.zeros((), dtype=torch.long, device=self.device)
        self.consecutive = torch.zeros((), dtype=torch.long, device=self.device)  # statistical spikes in a row
        self.spike_steps: list[int] = []  # bad steps within the last guard.window steps, for rollback
        self.skipped: list[dict] = []  # {"step", "draws"}: the samples whose update was dropped
        self.counts = {"spike_skipped": 0, "nan": 0, "rollback": 0, "rebaseline": 0}
        self.lr_scaled_until = 0  # steps up to this one run at guard.lr_factor x the scheduled rate

    def check(self, step: int, loss, grad_norm, check_grad_finite: bool = True) -> torch.Tensor:
        """The verdict on step `step` (1-based): a device tensor (see CODE ... REBASELINED), computed without
        reading anything back to the host. check_grad_finite=False with an fp16 gradient scaler: an overflowing
        gradient is its business (it skips the step and lowers the scale), not a spike."""
        c = self.cfg
        loss = torch.as_tensor(loss, dtype=self.dtype, device=self.device).detach()
        grad_norm = torch.as_tensor(grad_norm, dtype=self.dtype, device=self.device).detach()
        history = (~self.losses.isnan()).sum()
        mean = self.losses.nansum() / history.clamp(min=1)
        std = ((self.losses - mean) ** 2).nansum().div(history.clamp(min=1)).sqrt()
        median = self.grad_norms.nanquantile(0.5, interpolation="midpoint")  # statistics.median's midpoint
        armed = (history >= min(MIN_HISTORY, c.window)) & grad_norm.isfinite() & (step > self.min_step)
        code = torch.zeros((), dtype=self.dtype, device=self.device)
        # Assigned from the last test to the first, so that the first failing test names the step's reason.
        if c.grad_norm_factor:
            code = torch.where(armed & (grad_norm > c.grad_norm_factor * median), GRAD_FACTOR, code)
        if c.loss_z:
            code = torch.where(armed & (std > 0) & ((loss - mean) / std > c.loss_z), LOSS_Z, code)
        if c.loss_factor:
            code = torch.where(armed & (loss > c.loss_factor * mean), LOSS_FACTOR, code)
        if check_grad_finite:
            code = torch.where(grad_norm.isfinite(), code, NAN_GRAD)
        code = torch.where(loss.isfinite(), code, NAN_LOSS)
        return torch.stack([code, loss, grad_norm, mean, std, median, torch.zeros_like(code), code])

    @torch.no_grad()
    def update(self, verdict: torch.Tensor) -> None:
        """After the step, on the device: a good step with a finite gradient norm enters the statistics; statistical
        spikes in a row are counted, and guard.max_spikes of them under action=skip restart the statistics (marked
        in verdict[REBASELINED])."""
        code = verdict[CODE]
        good = code == GOOD
        accepted = good & verdict[GRAD_NORM].isfinite()  # an fp16 overflow says nothing of the level
        # A mask, not ring[head] = ...: indexing with a device tensor would read it back to the host.
        slot = accepted & (torch.arange(self.cfg.window, device=self.device) == self.head)
        self.losses = torch.where(slot, verdict[LOSS], self.losses)
        self.grad_norms = torch.where(slot, verdict[GRAD_NORM], self.grad_norms)
        self.head = (self.head + accepted.long()) % self.cfg.window
        unchanged = torch.where(good & ~accepted, self.consecutive, 0)
        self.consecutive = torch.where(code >= LOSS_FACTOR, self.consecutive + 1, unchanged)
        if self.cfg.action == "skip":
            shifted = self.consecutive >= self.cfg.max_spikes
            self.losses.masked_fill_(shifted, math.nan)
            self.grad_norms.masked_fill_(shifted, math.nan)
            self.head = torch.where(shifted, 0, self.head)
            self.consecutive = torch.where(shifted, 0, self.consecutive)
            verdict[REBASELINED] = shifted.to(self.dtype)

    def reason(self, verdict: list[float]) -> str | None:
        """Why a step was bad, from its verdict read back to the host; None for a good step."""
        code, loss, grad_norm, mean, std, median = int(verdict[CODE]), *verdict[LOSS:REBASELINED]
        if code != GOOD and int(verdict[LOCAL_CODE]) == GOOD:
            return "a bad step on another rank"
        c = self.cfg
        return {
            GOOD: None,
            NAN_LOSS: f"loss is {loss}",
            NAN_GRAD: f"gradient norm is {grad_norm}",
            LOSS_FACTOR: f"loss {loss:.4f} is above {c.loss_factor:g} x its running mean {mean:.4f}",
            LOSS_Z: f"loss {loss:.4f} is {(loss - mean) / max(std, 1e-300):.1f} standard deviations above its mean "
                    f"{mean:.4f}",
            GRAD_FACTOR: f"gradient norm {grad_norm:.4g} is above {c.grad_norm_factor:g} x its running median "
                         f"{median:.4g}",
        }[code]

    def record_spike(self, step: int, loss: float, draws: dict) -> str:
        """Count a bad step whose update was dropped; returns its event: "nan" or "spike_skipped"."""
        event = "spike_skipped" if math.isfinite(loss) else "nan"
        self.counts[event] += 1
        self.skipped.append({"step": step, "draws": draws})
        self.spike_steps = [s for s in self.spike_steps if s > step - self.cfg.window] + [step]
        return event

    def wants_rollback(self) -> bool:
        """guard.action=rollback and guard.max_spikes bad steps within the last guard.window steps."""
        return self.cfg.action == "rollback" and len(self.spike_steps) >= self.cfg.max_spikes

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
        """Plain Python values (read back at a save, not during a step): the rings slot by slot, None when empty."""
        def ring(t: torch.Tensor) -> list:
            return [None if math.isnan(v) else v for v in t.tolist()]

        return {"losses": ring(self.losses), "grad_norms": ring(self.grad_norms), "head": int(self.head),
                "consecutive": int(self.consecutive), "spike_steps": list(self.spike_steps),
                "skipped": list(self.skipped), "counts": dict(self.counts), "lr_scaled_until": self.lr_scaled_until}

    def load_state_dict(self, state: dict) -> None:
        losses, grad_norms = state["losses"], state["grad_norms"]
        if "head" in state and len(losses) == self.cfg.window:
            for name, values in (("losses", losses), ("grad_norms", grad_norms)):
                values = [math.nan if v is None else v for v in values]
                getattr(self, name).copy_(torch.tensor(values, dtype=self.dtype))
            self.head.fill_(state["head"])
        else:  # an earlier format (good steps' values, oldest first), or another guard.window: the newest values
            if "head" in state:
                order = [*range(state["head"], len(losses)), *range(state["head"])]  # the ring, oldest first
                losses, grad_norms = ([ring[i] for i in order if ring[i] is not None] for ring in (losses, grad_norms))
            for loss, grad_norm in zip(losses[-self.cfg.window:], grad_norms[-self.cfg.window:], strict=True):
                self.update(self.check(0, loss, grad_norm))
        self.consecutive.fill_(int(state.get("consecutive", 0)))
        self.spike_steps = list(state["spike_steps"])
        self.skipped = list(state["skipped"])
        self.counts.update(state["counts"])
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
        model_state, optimizer_state = get_state_dict(model, optimizer_list(optimizer),
                                                      options=StateDictOptions(cpu_offload=True))
        self._state = cpu_copy({"model": model_state, "optimizer": optimizer_state, "scaler": scaler.state_dict()})
        self.step, self.draws = step, list(draws)

    def restore(self, model, optimizer, scaler) -> None:
        # A fresh copy each time: loading may keep references to the tensors it is given (the optimizer state
        # does), and the snapshot must stay intact for a later rollback.
        state = cpu_copy(self._state)
        set_state_dict(model, optimizer_list(optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
