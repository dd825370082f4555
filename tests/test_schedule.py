import itertools
import math

import pytest

from minipretrain.config import OptimConfig
from minipretrain.train.schedule import lr_at


def test_cosine_warmup_end_mid_and_last_step():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)  # 1/10 of the way up
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)  # warmup ends at the peak
    mid = 10 + (110 - 1 - 10) / 2
    assert lr_at(int(mid), cfg, 110) == pytest.approx(0.55e-3, rel=0.02)
    assert lr_at(109, cfg, 110) == pytest.approx(1e-4)  # the last step reaches min_lr
    values = [lr_at(s, cfg, 110) for s in range(10, 110)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_minimind_formula():
    cfg = OptimConfig(lr=5e-4, schedule="minimind")
    for step, total in [(0, 100), (50, 100), (99, 100)]:
        expected = 5e-4 / 10 + 0.5 * 5e-4 * (1 + math.cos(math.pi * step / total))
        assert lr_at(step, cfg, total) == pytest.approx(expected)
    assert lr_at(0, cfg, 100) == pytest.approx(1.1 * 5e-4)
    assert lr_at(50, cfg, 100) == pytest.approx(0.6 * 5e-4)


def test_wsd_warmup_stable_decay():
    cfg = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(4, cfg, 100) == pytest.approx(0.5e-3)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(50, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(79, cfg, 100) == pytest.approx(1e-3)  # decay starts at 80
    assert lr_at(89, cfg, 100) == pytest.approx(0.5e-3)
    assert lr_at(99, cfg, 100) == pytest.approx(0.0, abs=1e-12)
