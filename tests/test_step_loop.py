"""A step loop without stalls: no host reads inside a step, batches built one step ahead, compile block by block."""

import math

import pytest
import torch
from conftest import data_overrides, step_losses, tiny_config
from torch.overrides import TorchFunctionMode

from minipretrain.data.batches import Batch
from minipretrain.data.prefetch import StepLoader, target_count
from minipretrain.train import loop
from minipretrain.train.metrics import read_metrics

# What turns a tensor into a Python value: on a GPU each is a synchronisation that stalls the step.
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}


class CountReads(TorchFunctionMode):
    """Counts the tensor-to-host reads Python makes, by the training step that makes them (lr_at marks the start
    of each step). Thread-local: the loader thread's work on its own CPU tensors is not counted."""

    def __init__(self):
        super().__init__()
        self.step, self.by_step = None, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.step is not None and name in READS:
            self.by_step.setdefault(self.step, []).append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra", [(), ("guard.action=rollback", "train.grad_accum=2")])
def test_a_step_reads_nothing_back_until_its_log_line(tmp_path, shakespeare, tokenizer_dir, monkeypatch, extra):
    counter, real_lr_at = CountReads(), loop.lr_at

    def lr_at(step, *args):
        counter.step = step + 1
        return real_lr_at(step, *args)

    monkeypatch.setattr(loop, "lr_at", lr_at)
    cfg = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=12", "train.log_every=4",
                      "train.eval_every=0", "train.save_every=0", *extra)
    with counter:
        loop.train(cfg, tmp_path / "run", show_progress=False)
    reads = {step: len(counter.by_step.get(step, [])) for step in range(1, 12)}
    assert all(reads[step] == 0 for step in (1, 2, 3, 5, 6, 7, 9, 10, 11)), counter.by_step
    assert 0 < reads[4] <= 3 and 0 < reads[8] <= 3, counter.by_step  # one read-back of the window, the flags
    logged = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert logged == [4, 8, 12]


def test_reading_every_fourth_step_changes_nothing(tmp_path, shakespeare, tokenizer_dir):
    """The numbers of a step do not depend on when they are read back: per-step losses equal the every-step run."""
    common = (*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=8", "model.dropout=0.1")
    loop.train(tiny_config(*common), tmp_path / "every", show_progress=False)
    loop.train(tiny_config(*common, "train.log_every=4"), tmp_path / "fourth", show_progress=False)
    every, fourth = step_losses(tmp_path / "every"), step_losses(tmp_path / "fourth")
    assert fourth == {4: every[4], 8: every[8]}
    lines = [r for r in read_metrics(tmp_path / "fourth" / "metrics.jsonl") if "loss" in r]
    assert all(0 <= r["data_wait_s"] < 1 for r in lines) and lines[-1]["tokens"] == 8 * 4 * 32


def test_a_spike_inside_a_window_is_skipped_and_reported_at_its_read_back(tmp_path, shakespeare, tokenizer_dir,
                                                                          monkeypatch):
    from test_stability import Faults

    faults = Faults(monkeypatch, {14: "nan"})
    cfg = tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=16", "train.log_every=4")
    summary = loop.train(cfg, tmp_path / "run", show_progress=False)
    before, after = faults.weights_at_start[14], faults.weights_at_start[15]
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped on the device, at once
    events = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "event" in r]
    assert [(e["step"], e["event"]) for e in events] == [(14, "nan")]
    assert summary["guard"]["nan"] == 1


def test_the_loader_builds_ahead_but_reports_the_trained_position():
    class Sampler:  # draws one row per call; its position is the number of calls
        def __init__(self):
            self.drawn = [0]

        def next_batch(self, batch_size, rank, world):
            self.drawn[0] += 1
            x = torch.full((batch_size, 4), self.drawn[0])
            return Batch(x, x)

        def state_dict(self):
            return {"drawn": list(self.drawn)}

        def tokens_by_source(self):
            return {"a": self.drawn[0] * 4}

    sampler = Sampler()
    loader = StepLoader(sampler, batch_size=2, grad_accum=3, dp_rank=0, dp_size=1, causal=True)
    first = loader.next()
    second = loader.next()
    assert [int(b.inputs[0, 0]) for b in first.micro_batches] == [1, 2, 3]
    assert first.drawn_before == [0] and first.state == {"drawn": [3]} and first.drawn_after == [3]
    assert second.state == {"drawn": [6]} and second.target_counts == [6, 6, 6]  # 2 rows x 3 predicted tokens
    assert sampler.drawn[0] >= 6  # the thread may already be a step further
    loader.close()


def test_a_loader_failure_reaches_the_training_loop():
    class Broken:
        def __init__(self):
            self.drawn = [0]

        def next_batch(self, *args):
            raise ValueError("bad shard")

    loader = StepLoader(Broken(), 2, 1, 0, 1, causal=True)
    with pytest.raises(ValueError, match="bad shard"):
        loader.next()
    loader.close()


def test_target_count_follows_the_objective():
    labels = torch.tensor([[1, 2, -100, 4]])
    assert target_count(Batch(labels, labels), causal=True) == 2  # shifted: positions 0 and 2 predict 2 and 4
    assert target_count(Batch(labels, labels), causal=False) == 3


def test_compile_is_on_for_cuda_only_unless_set(tmp_path, shakespeare, tokenizer_dir, capsys):
    assert tiny_config().train.compile is None  # auto
    loop.train(tiny_config(*data_overrides(shakespeare, tokenizer_dir), "train.max_steps=2"), tmp_path / "cpu",
               show_progress=False)
    assert "compiled" not in capsys.readouterr().out  # auto on a CPU: eager


def test_the_guard_verdicts_of_a_nan_step_are_finite_codes():
    from minipretrain.config import GuardConfig
    from minipretrain.train.stability import CODE, NAN_LOSS, SpikeGuard

    guard = SpikeGuard(GuardConfig(), 0)
    verdict = guard.check(1, torch.tensor(math.nan), torch.tensor(1.0))
    assert verdict[CODE] == NAN_LOSS and verdict.dtype == torch.float64
