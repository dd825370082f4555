"""Every preset in configs/ loads and validates; the GPU presets have the shapes, parameter counts and batches their
comments state (the batches sized with the memory planner for an 80 GiB GPU)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from minipretrain.config import load_config
from minipretrain.model import MiniMind
from minipretrain.plan import GIB, PlanOptions, make_plan

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.toml"))


def _model(name: str):
    """The preset's config and its model, built on the meta device (shapes without memory)."""
    cfg = load_config(CONFIGS / f"{name}.toml")
    with torch.device("meta"):
        return cfg, MiniMind(cfg.model)


def _comment(name: str) -> str:
    return " ".join(line.lstrip("# ") for line in (CONFIGS / f"{name}.toml").read_text().splitlines()
                    if line.startswith("#"))


def test_the_gpu_presets_are_there():
    assert {"llama-124m", "minimind2-104m"} <= {p.stem for p in PRESETS}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_validates_and_keeps_its_values(path):
    cfg = load_config(path)  # validation raises ConfigError naming the key
    assert (CONFIGS / path.name).read_text().startswith("# "), "a comment at the top says what the preset is"
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{path.name}: {section}.{key}"
    assert cfg.train.seq_len <= cfg.model.max_position_embeddings
    with torch.device("meta"):
        assert MiniMind(cfg.model).num_parameters() > 0


def test_llama_124m_shapes_and_parameter_count():
    cfg, model = _model("llama-124m")
    m, t = cfg.model, cfg.train
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads) == (768, 12, 12, 12)
    assert (m.vocab_size, t.seq_len) == (32000, 1024) and m.max_position_embeddings >= 1024
    assert m.intermediate_size == 2048  # the default formula, 64 * ceil(8 * 768 / 3 / 64)
    embedding = 32000 * 768  # tied: the output head is the same matrix
    attention = 4 * 768 * 768  # q, k, v, o: 12 kv heads, so k and v are as wide as q
    swiglu = 3 * 768 * 2048  # gate, up, down
    norms = 2 * 768
    expected = embedding + 12 * (attention + swiglu + norms) + 768  # + the final norm
    assert expected == 109_529_856
    assert model.num_parameters() == expected
    assert model.num_active_parameters() == expected


def test_minimind2_104m_parameter_count_and_sequence_length():
    cfg, model = _model("minimind2-104m")
    # MiniMind's published figure for MiniMind2 is 104.03M
    assert model.num_parameters() / 1e6 == pytest.approx(104.03, abs=0.01)
    assert cfg.train.seq_len == 1024


@pytest.mark.parametrize("name, millions", [
    ("minimind2-26m", 25.83),  # MiniMind's published figures: MiniMind2-Small, MiniMind2, minimind-3
    ("minimind2-104m", 104.03),
    ("minimind3-64m", 63.91),
    ("minimind3-30m", 30.03),  # the same layout at hidden 512
])
def test_minimind_presets_have_minimind_parameter_counts(name, millions):
    cfg, model = _model(name)
    assert model.num_parameters() / 1e6 == pytest.approx(millions, abs=0.005)
    if name.startswith("minimind3"):  # MiniMind-3's layout: QK-norm, 8 / 4 heads, SwiGLU width 64 * ceil(pi * h / 64)
        m = cfg.model
        assert (m.qk_norm, m.num_attention_heads, m.num_key_value_heads, m.rms_norm_eps) == (True, 8, 4, 1e-6)
        assert m.intermediate_size == 64 * math.ceil(math.pi * m.hidden_size / 64)


@pytest.mark.parametrize("name", ["llama-124m", "minimind2-104m"])
def test_gpu_batch_is_what_the_planner_says_fits_80_gib(name):
    cfg, _ = _model(name)
    plan = make_plan(cfg, PlanOptions(gpu_memory_gib=80))
    one_gpu = plan["memory"]["strategies"][0]  # ddp (ZeRO-0): one device holds everything
    comment = _comment(name)
    stated_peak = float(re.search(r"estimates a ([\d.]+) GiB peak", comment).group(1))
    stated_largest = int(re.search(r"the largest batch that fits 80 GiB: (\d+)", comment).group(1))
    assert one_gpu["total"] / GIB == pytest.approx(stated_peak, abs=0.05)
    assert one_gpu["largest_batch"] == stated_largest
    assert f"Batch {cfg.train.batch_size} x seq {cfg.train.seq_len}" in comment
    # headroom for the caching allocator, the CUDA context and compilation
    assert one_gpu["total"] <= 0.75 * 80 * GIB


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_train_with_what_the_quality_benchmark_chose(path):
    """Muon + WSD (benchmarks/quality.py), except llama-124m, the MFU yardstick, which keeps GPT-3 small's AdamW and
    cosine. One peak for both optimizers, as measured (a lower AdamW peak for the embedding and norms did worse): 4e-3
    for tiny, as measured; 4x MiniMind's AdamW peak of 5e-4 for the MiniMind presets."""
    o = load_config(path).optim
    if path.stem == "llama-124m":
        assert (o.name, o.schedule) == ("adamw", "cosine")
    elif path.stem.startswith("tiny"):
        assert (o.name, o.schedule, o.lr, o.muon_lr) == ("muon", "wsd", 4e-3, None)
    else:
        assert (o.name, o.schedule, o.lr, o.muon_lr) == ("muon", "wsd", 2e-3, None)
