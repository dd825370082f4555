"""benchmarks/quality.py: every cell's overrides load on the tiny preset and train what the cell names; medians,
spreads and the change against the baseline are computed over seeds; the JSON is written. The training itself is
replaced here (a grid takes an hour); the numbers it gives are in docs/performance.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import load_benchmark

from minipretrain.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(REPO / "benchmarks"))  # quality.py imports its sibling scripts, as when it runs
    try:
        yield load_benchmark("quality")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_every_cell_trains_what_it_names(quality, tmp_path):
    args = quality.parse_args(["--out", str(tmp_path)])
    prepared = {name: tmp_path / name for name in quality.MIXTURE}
    cells = quality.cells(args)
    assert [c["lr"] for c in cells if c["optimizer"] == "muon" and c["schedule"] == "wsd"] == [4e-3, 8e-3]
    assert {(c["optimizer"], c["schedule"]) for c in cells} == {
        ("adamw", "cosine"), ("adamw", "wsd"), ("muon", "cosine"), ("muon", "wsd")}
    assert sum(c["optimizer"] == "adamw" and c["schedule"] == "cosine" for c in cells) >= 3  # a learning-rate sweep
    extras = quality.extra_cells(args, cells[-1])
    assert [(c.get("batch_size"), c.get("warmup"), c.get("adamw_lr")) for c in extras] == [
        (8, None, None), (32, None, None), (None, 0.2, None), (None, None, 1e-3)]
    assert quality.extra_cells(args, cells[0])[-1].get("adamw_lr") is None  # a split only for a Muon cell
    for cell in cells + extras:
        cfg = load_config(REPO / "configs" / "tiny.toml",
                          quality.overrides(cell, 1338, 50 * 4096, prepared, tmp_path / "tok"))
        o = cfg.optim
        steps = 50 * 16 // cell.get("batch_size", 16)  # the same tokens whatever the batch
        assert (o.name, o.schedule, cfg.train.seed, cfg.train.max_steps) == (
            cell["optimizer"], cell["schedule"], 1338, steps)
        assert cfg.train.batch_size == cell.get("batch_size", 16)
        assert o.warmup_steps == (round(cell["warmup"] * steps) if "warmup" in cell else steps // 20)
        # a preset's own muon_lr would silently replace the cell's learning rate for the matrices
        assert (o.muon_lr or o.lr) == cell["lr"]
        assert o.lr == cell.get("adamw_lr", cell["lr"]) and o.min_lr == pytest.approx(o.lr / 10)
        assert (cfg.model.hidden_size, cfg.train.seq_len) == (256, 256)
        assert [s.name for s in cfg.data.sources] == list(quality.MIXTURE)


def test_the_table_takes_medians_and_spreads_over_seeds(quality, tmp_path, monkeypatch, capsys):
    bpb = {("adamw", "cosine"): 2.5, ("adamw", "wsd"): 2.4, ("muon", "cosine"): 2.0, ("muon", "wsd"): 1.9}
    trained = []

    def fake_train(run_dir, overrides):
        trained.append(run_dir.name)
        return {"elapsed_s": 10.0}, True

    def fake_evaluate(run_dir, prepared):
        optimizer, schedule, lr, *variant, seed = run_dir.name.split("-")
        value = bpb[optimizer, schedule] + float(lr[2:]) + (0.01 if seed == "seed1338" else 0.0) + 0.1 * len(variant)
        # the code corpus has 5x the held-out bytes: the score still weighs each corpus a third, as training does
        return {name: {"bytes": 500 if name == "code" else 100, "bits_per_byte": value + (0.3 if name == "zh" else 0)}
                for name in prepared}

    monkeypatch.setattr(quality.continual, "train_tokenizer", lambda out, *a: out)
    monkeypatch.setattr(quality.continual, "prepare", lambda out, tok, vf: {n: out / n for n in quality.MIXTURE})
    monkeypatch.setattr(quality.continual, "train", fake_train)
    monkeypatch.setattr(quality.continual, "evaluate", fake_evaluate)
    out = tmp_path / "quality.json"
    result = quality.main(["--out", str(tmp_path), "--tokens", "8192", "--seeds", "2", "--adamw-lrs", "1e-3,2e-3",
                           "--muon-lrs", "4e-3", "--adamw-wsd-lrs", "1e-3", "--muon-wsd-lrs", "4e-3",
                           "--warmups", "0,0.2", "--json", str(out)])
    # the grid twice, then the best cell (Muon + WSD) once at batch 8 and 32, with warmup 0% and 20%, and with
    # AdamW's peak at 1e-3
    assert len(trained) == 2 * 5 + 5 and "muon-wsd-lr0.004-seed1338" in trained
    assert trained[-5:] == ["muon-wsd-lr0.004-batch8-seed1337", "muon-wsd-lr0.004-batch32-seed1337",
                            "muon-wsd-lr0.004-warmup0-seed1337", "muon-wsd-lr0.004-warmup0.2-seed1337",
                            "muon-wsd-lr0.004-adamw0.001-seed1337"]
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {(r["optimizer"], r["schedule"], r["lr"]): r for r in result["rows"] if r["seeds"] == 2}  # the grid's
    baseline = rows["adamw", "cosine", 2e-3]
    assert baseline["median_bpb"] == pytest.approx(2.5 + 2e-3 + 0.005 + 0.1, abs=1e-4)  # zh's +0.3, a third of it
    assert baseline["median_bpb_by_corpus"]["zh"] == pytest.approx(2.5 + 2e-3 + 0.005 + 0.3, abs=1e-4)
    assert baseline["spread"] == pytest.approx(0.01, abs=1e-4) and baseline["seeds"] == 2
    muon = rows["muon", "wsd", 4e-3]
    table = capsys.readouterr().out
    change = muon["median_bpb"] / baseline["median_bpb"] - 1
    # English, Chinese and code columns after the change against the baseline
    assert (f"| muon | wsd | 0.004 | 16 | 5% | {muon['median_bpb']:.4f} | 2 | 0.0100 | {change:+.1%} "
            "| 1.9090 | 2.2090 | 1.9090 |") in table
    assert "| muon | wsd | 0.004 | 32 | 5% | 2.1040 | 1 | n/a |" in table
    assert "| muon | wsd | 0.004, AdamW 0.001 | 16 | 5% | 2.1040 | 1 | n/a |" in table
    assert "best cell: muon-wsd-lr0.004, 2.0090 bits/byte" in table and "best AdamW cell (adamw-wsd-lr0.001)" in table
    assert result["steps"] == 2 and result["tokens_per_run"] == 8192


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "100"], "--tokens must be at least one step"), (["--seeds", "0"], "--seeds at least 1"),
    (["--batch-sizes", "8,x"], "--batch-sizes takes integers"), (["--batch-sizes", "0"], "must be at least 1"),
    (["--warmups", "1.5"], "--warmups in [0, 1)"), (["--tokens", "5000", "--batch-sizes", "32"], "one step must fit"),
    (["--default-lr", "3e-3"], "must be one of --adamw-lrs"), (["--split-adamw-lr", "-1"], "must be >= 0")])
def test_bad_flags_are_refused(quality, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
