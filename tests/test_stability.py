"""The loss-spike guard (train/stability.py) with injected faults; preemption-safe stopping (train/preemption.py)."""

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import data_overrides, step_losses, tiny_config, train_cmd
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from minipretrain.config import GuardConfig
from minipretrain.errors import PREEMPTED_EXIT_CODE, ConfigError, UserError
from minipretrain.train import loop
from minipretrain.train.metrics import read_metrics
from minipretrain.train.preemption import SaveTimer
from minipretrain.train.schedule import lr_at
from minipretrain.train.stability import CODE, LOSS_FACTOR, MEAN, MEDIAN, MIN_HISTORY, REBASELINED, SpikeGuard

# --- the detector --------------------------------------------------------------------------------------------


def _warm(guard: SpikeGuard, n: int = 20, loss: float = 3.0, grad_norm: float = 1.0) -> None:
    for i in range(n):
        guard.update(guard.check(0, loss + 0.01 * (i % 3), grad_norm))  # step 0: before min_step, always good


def _reason(guard: SpikeGuard, step: int, loss: float, grad_norm: float, **kwargs) -> str | None:
    return guard.reason(guard.check(step, loss, grad_norm, **kwargs).tolist())


def test_detector_flags_non_finite_values_from_the_first_step():
    guard = SpikeGuard(GuardConfig(), warmup_steps=100)
    assert "nan" in _reason(guard, 1, math.nan, 1.0)
    assert "inf" in _reason(guard, 1, 2.0, math.inf)
    assert _reason(guard, 1, 2.0, math.inf, check_grad_finite=False) is None  # the fp16 scaler's business
    assert _reason(guard, 1, 50.0, 1e6) is None  # statistics wait for warmup and history


def test_detector_statistics():
    guard = SpikeGuard(GuardConfig(loss_factor=3.0, loss_z=6.0, grad_norm_factor=10.0), warmup_steps=0)
    _warm(guard, MIN_HISTORY - 1)
    assert _reason(guard, 50, 100.0, 1.0) is None  # not enough history yet
    _warm(guard, 1)
    assert _reason(guard, 50, 3.02, 1.0) is None
    assert "running mean" in _reason(guard, 50, 9.5, 1.0)
    assert "standard deviations" in _reason(guard, 50, 3.3, 1.0)  # z-score catches what the factor does not
    assert "running median" in _reason(guard, 50, 3.0, 10.5)
    assert _reason(guard, 50, 3.0, 9.5) is None
    off = SpikeGuard(GuardConfig(loss_factor=0, loss_z=0, grad_norm_factor=0), warmup_steps=0)
    _warm(off)
    assert _reason(off, 50, 1e3, 1e3) is None


def test_detector_statistics_equal_the_host_formulas_over_a_full_window():
    """The device rings give the mean, population deviation and median (midpoint of the two middle values) of the
    last guard.window good steps, as the statistics module does."""
    import statistics

    guard = SpikeGuard(GuardConfig(window=8), warmup_steps=0)
    losses, norms = [3.0 + 0.1 * i for i in range(13)], [1.0 + 0.05 * (i % 5) for i in range(13)]
    for loss, norm in zip(losses, norms, strict=True):
        guard.update(guard.check(0, loss, norm))
        guard.update(guard.check(0, math.nan, 1.0))  # a bad step: not in the statistics
    verdict = guard.check(1, 3.0, 1.0).tolist()
    assert verdict[1:3] == [3.0, 1.0]
    assert verdict[3] == pytest.approx(statistics.fmean(losses[-8:]), rel=1e-12)
    assert verdict[4] == pytest.approx(statistics.pstdev(losses[-8:]), rel=1e-12)
    assert verdict[5] == pytest.approx(statistics.median(norms[-8:]), rel=1e-12)


def test_spikes_in_a_row_are_a_new_level_under_skip():
    guard = SpikeGuard(GuardConfig(max_spikes=3), warmup_steps=0)
    _warm(guard)
    rebaselined = []
    for _ in range(3):
        verdict = guard.check(50, 3.0, 100.0)  # 100x the median gradient norm
        guard.update(verdict)
        rebaselined.append(verdict.tolist()[REBASELINED])
    assert rebaselined == [0.0, 0.0, 1.0]
    assert _reason(guard, 50, 3.0, 100.0) is None  # the statistics start again: nothing to compare with yet
    rolling = SpikeGuard(GuardConfig(action="rollback", max_spikes=3), warmup_steps=0)
    _warm(rolling)
    for _ in range(4):  # under rollback, spikes in a row are for the rollback: the statistics stay
        verdict = rolling.check(50, 3.0, 100.0)
        rolling.update(verdict)
    assert verdict.tolist()[REBASELINED] == 0.0 and _reason(rolling, 50, 3.0, 100.0) is not None


def test_a_non_finite_gradient_between_spikes_breaks_the_row():
    """Only statistical spikes in a row make a new level: a NaN or infinite gradient norm between them is
    divergence, not a level, and starts the count again."""
    guard = SpikeGuard(GuardConfig(max_spikes=3), warmup_steps=0)
    _warm(guard)
    rebaselined = []
    for grad_norm in (100.0, math.inf, 100.0, 100.0, 100.0):
        verdict = guard.check(50, 3.0, grad_norm)
        guard.update(verdict)
        rebaselined.append(verdict.tolist()[REBASELINED])
    assert rebaselined == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_a_step_only_another_rank_flagged_is_reported_as_such():
    guard = SpikeGuard(GuardConfig(), warmup_steps=0)
    verdict = guard.check(1, 3.0, 1.0)
    verdict[CODE] = LOSS_FACTOR  # the all-reduced code: another rank saw a spike
    assert guard.reason(verdict.tolist()) == "a bad step on another rank"


def test_a_resumed_guard_with_another_window_keeps_the_newest_values():
    import statistics

    old = SpikeGuard(GuardConfig(window=8), warmup_steps=0)
    losses = [3.0 + 0.1 * i for i in range(13)]  # the ring wraps: its head is mid-way
    for loss in losses:
        old.update(old.check(0, loss, loss))
    for window, kept in ((4, losses[-4:]), (20, losses[-8:])):
        new = SpikeGuard(GuardConfig(window=window), warmup_steps=0)
        new.load_state_dict(old.state_dict())
        verdict = new.check(1, 3.0, 1.0).tolist()
        assert verdict[MEAN] == pytest.approx(statistics.fmean(kept)), window
        assert verdict[MEDIAN] == pytest.approx(statistics.median(kept)), window


def test_min_step_defaults_to_warmup():
    guard = SpikeGuard(GuardConfig(), warmup_steps=30)
    _warm(guard)
    assert _reason(guard, 30, 100.0, 1.0) is None
    assert _reason(guard, 31, 100.0, 1.0) is not None
    assert SpikeGuard(GuardConfig(min_step=5), warmup_steps=30).min_step == 5


def test_rollback_counts_spikes_within_the_window_and_state_round_trips():
    guard = SpikeGuard(GuardConfig(action="rollback", max_spikes=2, window=10, lr_factor=0.5, lr_steps=4), 0)
    _warm(guard, 12)
    assert guard.record_spike(5, 9.0, {"a": [0, 4]}) == "spike_skipped"
    assert guard.record_spike(16, math.nan, {}) == "nan"  # step 5 fell out of the window
    assert not guard.wants_rollback()
    assert guard.record_spike(17, 9.0, {}) == "spike_skipped" and guard.wants_rollback()
    assert guard.rolled_back(17) and guard.spike_steps == []
    assert guard.lr_scale(21) == 0.5 and guard.lr_scale(22) == 1.0
    copy = SpikeGuard(guard.cfg, 0)
    copy.load_state_dict(guard.state_dict())
    assert copy.state_dict() == guard.state_dict()
    assert guard.summary() == {"spike_skipped": 2, "nan": 1, "rollback": 1, "rebaseline": 0}


def test_guard_state_of_earlier_checkpoints_loads():
    """Checkpoints written before the guard moved to the device hold its history as lists, oldest first."""
    old = {"losses": [3.0, 3.1, 3.2], "grad_norms": [1.0, 2.0, 3.0], "spike_steps": [4], "skipped": [],
           "counts": {"spike_skipped": 1, "nan": 0, "rollback": 0, "rebaseline": 0}, "lr_scaled_until": 0,
           "consecutive": 1}
    guard = SpikeGuard(GuardConfig(window=5), 0)
    guard.load_state_dict(old)
    verdict = guard.check(1, 3.0, 1.0).tolist()
    assert verdict[3] == pytest.approx(3.1) and verdict[5] == 2.0 and int(guard.consecutive) == 1
    assert guard.spike_steps == [4] and guard.counts["spike_skipped"] == 1


@pytest.mark.parametrize("bad", ["guard.action=retry", "guard.loss_factor=0.5", "guard.window=0",
                                 "guard.max_spikes=200", "guard.lr_factor=2", "train.save_every_minutes=-1"])
def test_bad_guard_settings_are_refused(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        tiny_config(bad)


# --- injected faults in real training runs -------------------------------------------------------------------


REAL_LR_AT, REAL_ACCUMULATE = loop.lr_at, loop.accumulate_gradients


class Faults:
    """Wraps the trainer's accumulate_gradients to corrupt chosen steps (1-based), and records the weights each
    step starts from. kinds: garbage (random tokens and labels), nan (a NaN forward: loss and gradients),
    explode (gradients x 1e4), shift (gradients x 30: a lasting new level when given for every later step), crash
    (the process dies here). The test model is so small that its loss on anything
    stays near ln(vocab): garbage lifts it by about 1.35x, so these tests set guard.loss_factor=1.2."""

    def __init__(self, monkeypatch, faults: dict[int, str]):
        self.faults, self.step, self.weights_at_start = faults, 0, {}
        real_lr_at, real_accumulate = REAL_LR_AT, REAL_ACCUMULATE  # not an earlier Faults' wrappers

        def lr_at(step, *args):
            self.step = step + 1  # the step about to be taken
            return real_lr_at(step, *args)

        def accumulate(step_model, micro_batches, *args, **kwargs):
            model = getattr(step_model, "module", step_model)
            self.weights_at_start[self.step] = {k: v.clone() for k, v in model.state_dict().items()}
            kind = self.faults.get(self.step)
            if kind == "crash":
                raise RuntimeError("injected crash")
            if kind == "garbage":  # random tokens, labelled with the token the model expects least
                gen = torch.Generator().manual_seed(self.step)
                inputs = [torch.randint(0, 320, b.inputs.shape, generator=gen) for b in micro_batches]
                with torch.no_grad():
                    worst = [int(model(x).logits.mean((0, 1)).argmin()) for x in inputs]
                micro_batches = [b._replace(inputs=x, labels=torch.full_like(x, w), doc_ids=None)
                                 for b, x, w in zip(micro_batches, inputs, worst, strict=True)]
            loss, aux = real_accumulate(step_model, micro_batches, *args, **kwargs)
            if kind in ("nan", "explode", "shift"):
                for p in model.parameters():
                    p.grad.mul_({"nan": math.nan, "explode": 1e4, "shift": 30.0}[kind])
                loss = torch.full_like(loss, math.nan) if kind == "nan" else loss
            return loss, aux

        monkeypatch.setattr(loop, "lr_at", lr_at)
        monkeypatch.setattr(loop, "accumulate_gradients", accumulate)


def _cfg(shakespeare, tokenizer_dir, *extra):
    return tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=30", "optim.warmup_steps=5",
                       "train.save_every=10", "model.dropout=0.1", *extra)


def _events(run) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "event" in r]


@pytest.mark.parametrize("kind", ["garbage", "nan", "explode"])
def test_a_bad_step_is_skipped_and_leaves_weights_and_adam_untouched(tmp_path, shakespeare, tokenizer_dir,
                                                                   monkeypatch, kind):
    faults = Faults(monkeypatch, {20: kind})
    adam_steps = []  # Adam's step count after each optimizer.step() call (the fused kernel skips a bad one itself)
    handle = register_optimizer_step_post_hook(
        lambda opt, *a: adam_steps.append(int(next(iter(opt.state.values()))["step"])))
    try:
        summary = loop.train(_cfg(shakespeare, tokenizer_dir, "guard.loss_factor=1.2"), tmp_path / "run",
                             show_progress=False)
    finally:
        handle.remove()
    before, after = faults.weights_at_start[20], faults.weights_at_start[21]
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise: nothing of step 20 got in
    assert adam_steps[18:21] == [19, 19, 20]  # Adam never stepped on it (its moments and step count untouched)
    assert adam_steps[-1] == 29
    [event] = _events(tmp_path / "run")
    assert event["step"] == 20 and event["event"] == ("nan" if kind == "nan" else "spike_skipped")
    assert event["draws"] == {"shakespeare": [19 * 4, 20 * 4]}  # the batch's samples: draws 76..79
    assert summary["guard"]["nan" if kind == "nan" else "spike_skipped"] == 1
    assert [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("step") == 20] == [event]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_000030" / "train_state.pt", weights_only=True)
    assert state["guard"]["skipped"] == [{"step": 20, "draws": event["draws"]}]


def test_a_skipped_spike_ends_within_noise_of_a_clean_run(tmp_path, shakespeare, tokenizer_dir, monkeypatch):
    clean = loop.train(_cfg(shakespeare, tokenizer_dir, "train.eval_every=0"), tmp_path / "clean", show_progress=False)
    Faults(monkeypatch, {15: "explode", 22: "garbage"})
    guarded = loop.train(_cfg(shakespeare, tokenizer_dir, "guard.loss_factor=1.2"), tmp_path / "guarded",
                         show_progress=False)
    assert guarded["guard"]["spike_skipped"] == 2
    assert abs(guarded["final_val_loss"] - clean["final_val_loss"]) < 0.02 * clean["final_val_loss"]


def test_a_lasting_shift_is_a_new_level_not_a_spike_per_step(tmp_path, shakespeare, tokenizer_dir, monkeypatch):
    Faults(monkeypatch, {s: "shift" for s in range(15, 31)})  # gradients 30x larger from step 15 on, for good
    summary = loop.train(_cfg(shakespeare, tokenizer_dir), tmp_path / "run", show_progress=False)
    events = _events(tmp_path / "run")
    assert [(e["step"], e["event"]) for e in events] == [(15, "spike_skipped"), (16, "spike_skipped"),
                                                          (17, "spike_skipped"), (17, "rebaseline")]
    assert summary["guard"]["spike_skipped"] == 3  # then training goes on: steps 18-30 are applied
    assert all(s in step_losses(tmp_path / "run") for s in range(18, 31))


def test_without_the_guard_an_injected_fault_stops_the_run_naming_the_checkpoint(tmp_path, shakespeare,
                                                                                 tokenizer_dir, monkeypatch):
    Faults(monkeypatch, {14: "nan"})
    with pytest.raises(UserError, match=r"step 14: loss is nan: training diverged .*continue from .*step_000010"):
        loop.train(_cfg(shakespeare, tokenizer_dir, "guard.action=stop"), tmp_path / "run", show_progress=False)
    assert _events(tmp_path / "run")[0]["event"] == "stopped"


ROLLBACK = ("guard.action=rollback", "guard.max_spikes=2", "guard.window=5", "guard.lr_factor=0.5",
            "guard.lr_steps=3", "guard.loss_factor=1.2")


def test_rollback_restores_the_last_snapshot_and_skips_the_data(tmp_path, shakespeare, tokenizer_dir, monkeypatch):
    faults = Faults(monkeypatch, {13: "garbage", 14: "nan"})
    summary = loop.train(_cfg(shakespeare, tokenizer_dir, *ROLLBACK), tmp_path / "run", show_progress=False)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_000010" / "model.safetensors")
    restored = faults.weights_at_start[15]
    assert all(torch.equal(saved[k], restored[k]) for k in saved)  # step 15 starts from step 10's weights
    events = _events(tmp_path / "run")
    assert [e["event"] for e in events] == ["spike_skipped", "nan", "rollback"]
    rollback = events[-1]
    assert rollback["to_step"] == 10 and rollback["draws"] == {"shakespeare": [40, 56]}  # steps 11-14 skipped
    assert summary["guard"] == {"spike_skipped": 1, "nan": 1, "rollback": 1, "rebaseline": 0}
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r}
    cfg = _cfg(shakespeare, tokenizer_dir, *ROLLBACK)
    assert lrs[16] == pytest.approx(0.5 * lr_at(15, cfg.optim, 30))
    assert lrs[18] == pytest.approx(lr_at(17, cfg.optim, 30))


def test_crash_and_resume_after_a_rollback_gives_the_same_losses(tmp_path, shakespeare, tokenizer_dir, monkeypatch):
    cfg = _cfg(shakespeare, tokenizer_dir, *ROLLBACK, "train.save_every=5")
    spikes = {13: "garbage", 14: "nan", 24: "explode"}
    Faults(monkeypatch, spikes)
    loop.train(cfg, tmp_path / "reference", show_progress=False)
    crashing = Faults(monkeypatch, {**spikes, 18: "crash"})
    with pytest.raises(RuntimeError, match="injected crash"):
        loop.train(cfg, tmp_path / "crashed", show_progress=False)
    crashing.faults.pop(18)
    loop.train(cfg, tmp_path / "crashed", resume=True, show_progress=False)  # from step 15, after the rollback
    assert step_losses(tmp_path / "crashed") == step_losses(tmp_path / "reference")
    assert _events(tmp_path / "crashed") == _events(tmp_path / "reference")


def test_too_many_rollbacks_stop_the_run(tmp_path, shakespeare, tokenizer_dir, monkeypatch):
    Faults(monkeypatch, {s: "nan" for s in range(12, 30)})
    with pytest.raises(UserError, match="rollbacks did not stop the loss spikes"):
        loop.train(_cfg(shakespeare, tokenizer_dir, *ROLLBACK, "guard.max_rollbacks=2"), tmp_path / "run",
                   show_progress=False)


# --- preemption ----------------------------------------------------------------------------------------------

SIGNAL_AT_STEP = """
import os, signal, sys
from minipretrain.train import loop
step_to_signal, name, rank = int(sys.argv[1]), sys.argv[2], sys.argv[3]
real = loop.lr_at

def lr_at(step, *args):
    if step + 1 == step_to_signal and os.environ.get("RANK", "0") == rank:
        os.kill(os.getpid(), getattr(signal, name))  # arrives while the step runs, on this rank only
    return real(step, *args)

loop.lr_at = lr_at
from minipretrain.cli import main
main(sys.argv[4:])
"""


def _config_file(tmp_path, shakespeare, tokenizer_dir, *extra) -> list[str]:
    """`--config FILE` arguments for a short run with dropout (so that resuming must restore the RNG too)."""
    cfg = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=24", "train.save_every=0",
                      "model.dropout=0.1", *extra)
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    return ["--config", str(path)]


@pytest.mark.parametrize("name, log_every", [("SIGTERM", 1), ("SIGUSR1", 1), ("SIGINT", 1), ("SIGTERM", 4)])
def test_a_signal_saves_at_the_current_step_and_resume_matches(tmp_path, shakespeare, tokenizer_dir, name,
                                                               log_every):
    """Also between two log lines (log_every=4, a signal at step 9): the flag is read every step."""
    config = _config_file(tmp_path, shakespeare, tokenizer_dir, f"train.log_every={log_every}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train_cmd(tmp_path / "reference", *config), check=True, env=env, capture_output=True)
    script = tmp_path / "send_signal_at_step.py"
    script.write_text(SIGNAL_AT_STEP)
    cmd = [sys.executable, str(script), "9", name, "0", *train_cmd(tmp_path / "run", *config)[3:]]
    stopped = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr
    assert f"stopped by {name} at step 9" in stopped.stderr
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoints/step_000009"
    assert _events(tmp_path / "run")[-1] == {"step": 9, "event": "preempted", "signal": name}
    resumed = subprocess.run(train_cmd(tmp_path / "run", "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert step_losses(tmp_path / "run") == step_losses(tmp_path / "reference")  # nothing lost, exactly


def test_sigterm_from_outside_mid_run(tmp_path, shakespeare, tokenizer_dir):
    config = _config_file(tmp_path, shakespeare, tokenizer_dir, "train.max_steps=400")
    proc = subprocess.Popen(train_cmd(tmp_path / "run", *config), env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "run" / "metrics.jsonl").exists() and len(step_losses(tmp_path / "run")) >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    last = max(step_losses(tmp_path / "run"))
    assert (tmp_path / "run" / "latest").read_text().strip() == f"checkpoints/step_{last:06d}"


def test_a_second_signal_exits_at_once():
    script = textwrap.dedent("""
        import os, signal, time
        from minipretrain.train.preemption import StopSignals
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            assert signals.received == "SIGTERM"
            os.kill(os.getpid(), signal.SIGUSR1)  # the same warning a moment later, by another path: ignored
            time.sleep(2.5)
            os.kill(os.getpid(), signal.SIGTERM)  # a second request: exit now
            time.sleep(5)
        raise SystemExit("not reached")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "SIGTERM again: exiting now" in result.stderr and "SIGUSR1" not in result.stderr


def test_save_every_minutes(tmp_path, shakespeare, tokenizer_dir, monkeypatch):
    timer = SaveTimer(0.5)
    now = [1000.0]
    monkeypatch.setattr("minipretrain.train.preemption.time.monotonic", lambda: now[0])
    timer.reset()
    now[0] += 29
    assert not timer.due()
    now[0] += 1
    assert timer.due()
    assert not SaveTimer(0).due()
    clock = iter(range(0, 10**6, 20))  # 20 s per call: a save every few steps
    monkeypatch.setattr("minipretrain.train.preemption.time.monotonic", lambda: next(clock))
    cfg = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=12", "train.save_every=0",
                      "train.save_every_minutes=1", "train.keep_checkpoints=20")
    loop.train(cfg, tmp_path / "run", show_progress=False)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert len(saved) > 2 and saved[-1] == "step_000012"


def test_sigterm_to_one_rank_of_two_saves_on_both_and_resumes(tmp_path, shakespeare, tokenizer_dir):
    from test_distributed import _assert_same_steps, _steps, torchrun

    sets = [*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=10", "train.save_every=0"]
    loop.train(tiny_config(*sets, "train.batch_size=4"), tmp_path / "single", show_progress=False)
    config = tmp_path / "config.toml"
    config.write_text(tiny_config(*sets, "train.batch_size=2").to_toml())  # per rank: the same global batch
    script = tmp_path / "send_signal_at_step.py"
    script.write_text(SIGNAL_AT_STEP)
    run = tmp_path / "run"
    stopped = torchrun(2, "4", "SIGTERM", "1", "train", "--config", str(config), "--run-dir", str(run),
                       "--no-progress", script=[str(script)], check=False)
    assert stopped.returncode != 0  # torchrun reports its workers' status 75 as a failure of its own
    assert "[rank 1] stopped by SIGTERM at step 4" in stopped.stderr
    assert "[rank 0] stopped by a signal to another rank at step 4" in stopped.stderr
    assert (run / "latest").read_text().strip() == "checkpoints/step_000004"
    assert len(list((run / "checkpoints" / "step_000004").glob("rng_*.pt"))) == 2  # both ranks saved
    torchrun(2, "train", "--run-dir", str(run), "--resume", "--no-progress")
    _assert_same_steps(_steps(run), _steps(tmp_path / "single"), range(1, 11))


def test_torchrun_forwards_the_warning_signal_as_the_examples_launch_it(tmp_path, shakespeare, tokenizer_dir):
    """examples/slurm.sbatch: torchrun --signals-to-handle ... SIGUSR1 passes Slurm's warning to every rank."""
    cfg = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=100000", "train.save_every=0",
                      "train.batch_size=2")
    config = tmp_path / "config.toml"
    config.write_text(cfg.to_toml())
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1", "--shutdown-timeout=120", "-m", "minipretrain", "train",
           "--config", str(config), "--run-dir", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(step_losses(run)) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=180)
    assert "[rank 0] stopped by SIGUSR1" in err and "[rank 1] stopped by SIGUSR1" in err, err[-3000:]
    last = max(step_losses(run))
    assert (run / "latest").read_text().strip() == f"checkpoints/step_{last:06d}"
    assert _events(run)[-1] == {"step": last, "event": "preempted", "signal": "SIGUSR1"}


BAD_STEP_ON_ONE_RANK = """
import os, sys
from minipretrain.train import stability
real_check = stability.SpikeGuard.check

def check(self, step, *args, **kwargs):  # rank 1 alone (or the single process) sees step 4 as a spike
    verdict = real_check(self, step, *args, **kwargs)
    if step == 4 and os.environ.get("RANK", "1") == "1":
        verdict[stability.CODE] = stability.LOSS_FACTOR
    return verdict

stability.SpikeGuard.check = check
from minipretrain.cli import main
main(sys.argv[1:])
"""


def test_a_bad_step_seen_by_one_rank_is_rolled_back_by_all_under_fsdp(tmp_path, shakespeare, tokenizer_dir):
    from test_distributed import _assert_same_steps, _steps, torchrun

    sets = [*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=8", "train.save_every=3",
            "guard.action=rollback", "guard.max_spikes=1"]
    script = tmp_path / "bad_step.py"
    script.write_text(BAD_STEP_ON_ONE_RANK)
    single, sharded = tmp_path / "single.toml", tmp_path / "fsdp.toml"
    single.write_text(tiny_config(*sets, "train.batch_size=4").to_toml())
    sharded.write_text(tiny_config(*sets, "train.batch_size=2", "parallel.mode=fsdp").to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), "train", "--config", str(single), "--run-dir",
                    str(tmp_path / "one"), "--no-progress"], check=True, env=env, capture_output=True)
    torchrun(2, "train", "--config", str(sharded), "--run-dir", str(tmp_path / "two"), "--no-progress",
             script=[str(script)])
    for run in ("one", "two"):
        assert [(e["step"], e["event"]) for e in _events(tmp_path / run)] == [(4, "spike_skipped"), (4, "rollback")]
        assert _events(tmp_path / run)[-1]["to_step"] == 3
    _assert_same_steps(_steps(tmp_path / "two"), _steps(tmp_path / "one"), [1, 2, 3, 5, 6, 7, 8])
